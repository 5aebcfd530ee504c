//! A four-level page table (9 bits per level, 4 KiB pages, 48-bit addresses). Interior
//! levels are allocated lazily and never freed (like Linux, which frees page tables only
//! in `free_pgtables`); each last-level table has its own lock, the *page-table lock*, so
//! faults on different 2 MiB regions run in parallel.
//!
//! # Mapping sizes
//! An entry maps `PAGE_SIZE << order` bytes ([`PageOrder`]): order 0 is a 4 KiB page, the
//! only size the simulation creates today. A last-level table can also stand for one
//! 2 MiB entry ([`PageOrder::PMD`], Linux's huge PMD): its first slot holds the entry,
//! with that order, and the other slots are empty; [`PageTable::pte`] and
//! [`Leaf::entry`] then give that entry for every address in the 2 MiB. Code that needs
//! the extent of what an entry maps asks the entry ([`Pte::order`],
//! [`PageOrder::span`]) rather than assuming a page, so that huge entries can be
//! created later without changing the readers.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::OnceLock;

use parking_lot::{Mutex, MutexGuard};

use crate::frame::Pfn;

/// Bytes in a page.
pub const PAGE_SIZE: u64 = 4096;
/// The first address above user space (48-bit, like x86-64 with 4-level paging).
pub const TASK_SIZE: u64 = 1 << 47;
const ENTRIES: usize = 512;

/// The size of a mapping, as a power of two of pages: it maps `PAGE_SIZE << order` bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageOrder(u8);

impl PageOrder {
    /// A 4 KiB page.
    pub const BASE: PageOrder = PageOrder(0);
    /// A 2 MiB entry: a whole last-level table's span (Linux's PMD-mapped huge page).
    pub const PMD: PageOrder = PageOrder(9);

    /// The order `order`, if an entry can have it (at most [`PMD`](Self::PMD)).
    pub const fn new(order: u8) -> Option<Self> {
        if order <= Self::PMD.0 {
            Some(PageOrder(order))
        } else {
            None
        }
    }

    /// The order as a number (0 for 4 KiB, 9 for 2 MiB).
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Bytes mapped.
    pub const fn size(self) -> u64 {
        PAGE_SIZE << self.0
    }

    /// Pages mapped.
    pub const fn pages(self) -> u64 {
        1 << self.0
    }

    /// The start of the mapping of this size that contains `addr`.
    pub const fn align_down(self, addr: u64) -> u64 {
        addr & !(self.size() - 1)
    }

    /// `[start, end)` of the mapping of this size that contains `addr`.
    pub const fn span(self, addr: u64) -> (u64, u64) {
        let start = self.align_down(addr);
        (start, start + self.size())
    }
}

impl std::fmt::Debug for PageOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.size() {
            s if s >= 1 << 20 => write!(f, "PageOrder({} = {} MiB)", self.0, s >> 20),
            s => write!(f, "PageOrder({} = {} KiB)", self.0, s >> 10),
        }
    }
}

/// A page-table entry: flag bits, a kind, and a frame (or swap slot) number.
///
/// A present entry maps a frame. The other non-empty kinds keep a frame or slot for the
/// primary while no access may go through the entry: a swap entry (the page's data is in
/// a swap slot), a busy entry (the page is being copied, migrated or written out; faults
/// wait for it, like Linux's migration entries), and a device-exclusive entry (a device
/// owns the page; a CPU fault restores it first).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pte(u64);

/// What a [`Pte`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PteKind {
    /// Nothing mapped.
    None,
    /// A frame, accessible as the flags say.
    Present(Pfn),
    /// The page's data is in this swap slot.
    Swap(u32),
    /// The frame is in transition (copy, migration, swap-out); faults wait.
    Busy(Pfn),
    /// A device has exclusive access to the frame; CPU access restores it first.
    Exclusive(Pfn),
    /// The frame stays but nothing may access it (`PROT_NONE`): not present to any
    /// hardware walking the table; `mprotect` makes it present again.
    ProtNone(Pfn),
}

impl Pte {
    const PRESENT: u64 = 1 << 0;
    const WRITABLE: u64 = 1 << 1;
    const ACCESSED: u64 = 1 << 2;
    const DIRTY: u64 = 1 << 3;
    const SOFT_DIRTY: u64 = 1 << 4;
    const LAZYFREE: u64 = 1 << 8;
    const ORDER_SHIFT: u32 = 9;
    const ORDER_MASK: u64 = 0b1111 << Self::ORDER_SHIFT;
    /// What stays when the entry changes kind (to busy, exclusive, back to present): the
    /// flags and the size.
    const FLAGS: u64 = Self::WRITABLE
        | Self::ACCESSED
        | Self::DIRTY
        | Self::SOFT_DIRTY
        | Self::LAZYFREE
        | Self::ORDER_MASK;
    const KIND_SHIFT: u32 = 5;
    const KIND_MASK: u64 = 0b111 << Self::KIND_SHIFT;
    const KIND_SWAP: u64 = 1;
    const KIND_BUSY: u64 = 2;
    const KIND_EXCLUSIVE: u64 = 3;
    const KIND_PROT_NONE: u64 = 4;

    /// A present entry for `pfn`, mapping one page (order 0; see
    /// [`with_order`](Self::with_order)).
    pub fn new(pfn: Pfn, writable: bool) -> Self {
        let mut p = Pte(((pfn.0 as u64) << 32) | Self::PRESENT);
        p.set(Self::WRITABLE, writable);
        p
    }
    /// The size this entry maps: `PAGE_SIZE << order` bytes from the address aligned to
    /// it (for a frame, the frames from its number on).
    pub fn order(self) -> PageOrder {
        PageOrder(((self.0 & Self::ORDER_MASK) >> Self::ORDER_SHIFT) as u8)
    }
    /// The entry mapping `order` (its frame is the first of `order.pages()`).
    pub fn with_order(self, order: PageOrder) -> Self {
        Pte((self.0 & !Self::ORDER_MASK) | ((order.0 as u64) << Self::ORDER_SHIFT))
    }
    /// A swap entry for `slot` (one page), keeping this entry's soft-dirty bit.
    pub fn to_swap(self, slot: u32) -> Self {
        Pte(((slot as u64) << 32)
            | (Self::KIND_SWAP << Self::KIND_SHIFT)
            | (self.0 & Self::SOFT_DIRTY))
    }
    /// The same frame, busy (keeps the flags, so it can be restored).
    pub fn to_busy(self) -> Self {
        Pte((self.0 & !(Self::PRESENT | Self::KIND_MASK)) | (Self::KIND_BUSY << Self::KIND_SHIFT))
    }
    /// The same frame, owned exclusively by a device (keeps the flags).
    pub fn to_exclusive(self) -> Self {
        Pte((self.0 & !(Self::PRESENT | Self::KIND_MASK))
            | (Self::KIND_EXCLUSIVE << Self::KIND_SHIFT))
    }
    /// The same frame, inaccessible (`PROT_NONE`; keeps the flags but write permission).
    pub fn to_prot_none(self) -> Self {
        Pte(
            (self.0 & !(Self::PRESENT | Self::KIND_MASK | Self::WRITABLE))
                | (Self::KIND_PROT_NONE << Self::KIND_SHIFT),
        )
    }
    /// A busy or exclusive entry made present again, with its flags; `pfn` replaces the
    /// frame (a migration's new frame, or the same one).
    pub fn to_present(self, pfn: Pfn) -> Self {
        Pte(((pfn.0 as u64) << 32) | (self.0 & Self::FLAGS) | Self::PRESENT)
    }
    fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
    fn set(&mut self, bit: u64, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }
    /// What the entry holds.
    pub fn kind(self) -> PteKind {
        let n = (self.0 >> 32) as u32;
        if self.present() {
            return PteKind::Present(Pfn(n));
        }
        match (self.0 & Self::KIND_MASK) >> Self::KIND_SHIFT {
            Self::KIND_SWAP => PteKind::Swap(n),
            Self::KIND_BUSY => PteKind::Busy(Pfn(n)),
            Self::KIND_EXCLUSIVE => PteKind::Exclusive(Pfn(n)),
            Self::KIND_PROT_NONE => PteKind::ProtNone(Pfn(n)),
            _ => PteKind::None,
        }
    }
    /// Whether the entry is empty.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
    /// Whether the entry maps a frame.
    pub fn present(self) -> bool {
        self.has(Self::PRESENT)
    }
    /// Whether writes are allowed through it.
    pub fn writable(self) -> bool {
        self.has(Self::WRITABLE)
    }
    /// Whether it was used since the bit was last cleared.
    pub fn accessed(self) -> bool {
        self.has(Self::ACCESSED)
    }
    /// Whether it was written since the bit was last cleared.
    pub fn dirty(self) -> bool {
        self.has(Self::DIRTY)
    }
    /// Whether it was written since the last soft-dirty reset.
    pub fn soft_dirty(self) -> bool {
        self.has(Self::SOFT_DIRTY)
    }
    /// The frame, if present.
    pub fn pfn(self) -> Option<Pfn> {
        self.present().then_some(Pfn((self.0 >> 32) as u32))
    }
    /// The frame the entry holds a reference on (present, busy or exclusive).
    pub fn frame(self) -> Option<Pfn> {
        match self.kind() {
            PteKind::Present(p)
            | PteKind::Busy(p)
            | PteKind::Exclusive(p)
            | PteKind::ProtNone(p) => Some(p),
            PteKind::None | PteKind::Swap(_) => None,
        }
    }
    /// Marks an access (and a write, which also sets dirty and soft-dirty).
    pub fn touch(&mut self, write: bool) {
        self.set(Self::ACCESSED, true);
        if write {
            self.set(Self::DIRTY, true);
            self.set(Self::SOFT_DIRTY, true);
            self.set(Self::LAZYFREE, false);
        }
    }
    /// Whether `madvise(MADV_FREE)` marked the page free-able and it was not written
    /// since: reclaim may then drop it instead of swapping it out.
    pub fn lazyfree(self) -> bool {
        self.has(Self::LAZYFREE)
    }
    /// The entry marked free-able (`MADV_FREE`): old, clean and lazy-free.
    pub fn to_lazyfree(mut self) -> Self {
        self.set(Self::ACCESSED, false);
        self.set(Self::DIRTY, false);
        self.set(Self::LAZYFREE, true);
        self
    }
    /// Whether two entries hold the same thing with the same permission (accessed and
    /// dirty bits aside), as Linux's `pte_same` is used after retaking the lock.
    pub fn same_mapping(self, other: Pte) -> bool {
        self.kind() == other.kind() && self.writable() == other.writable()
    }
    /// The entry with its write permission set or cleared.
    pub fn with_writable(mut self, writable: bool) -> Self {
        self.set(Self::WRITABLE, writable);
        self
    }
    /// The entry with its accessed bit cleared.
    pub fn old(mut self) -> Self {
        self.set(Self::ACCESSED, false);
        self
    }
    /// The entry with its dirty bit cleared.
    pub fn clean(mut self) -> Self {
        self.set(Self::DIRTY, false);
        self
    }
    /// The entry with its soft-dirty bit cleared.
    pub fn soft_clean(mut self) -> Self {
        self.set(Self::SOFT_DIRTY, false);
        self
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flags = format!(
            "{}{}{}{}{}",
            if self.writable() { " W" } else { " RO" },
            if self.accessed() { " A" } else { "" },
            if self.dirty() { " D" } else { "" },
            if self.soft_dirty() { " SD" } else { "" },
            match self.order().get() {
                0 => String::new(),
                o => format!(" order {o}"),
            },
        );
        match self.kind() {
            PteKind::None => write!(f, "Pte(none)"),
            PteKind::Present(p) => write!(f, "Pte({p:?}{flags})"),
            PteKind::Busy(p) => write!(f, "Pte(busy {p:?}{flags})"),
            PteKind::ProtNone(p) => write!(f, "Pte(prot-none {p:?}{flags})"),
            PteKind::Exclusive(p) => write!(f, "Pte(exclusive {p:?}{flags})"),
            PteKind::Swap(s) => write!(
                f,
                "Pte(swap {s}{})",
                if self.soft_dirty() { " SD" } else { "" }
            ),
        }
    }
}

/// A last-level table: 512 entries behind the page-table lock.
pub struct Leaf {
    ptes: Mutex<[Pte; ENTRIES]>,
    /// Whether the table is in use (Linux: the middle-level entry is not none). Set by
    /// the first fault into it, cleared when `munmap` frees it; the memory itself is kept
    /// (an interior level is never deallocated, so lock-free readers stay valid).
    /// Written only under the mmap lock (any side), read under it for writing.
    live: AtomicBool,
}

/// A held page-table lock over one last-level table.
pub type LeafGuard<'a> = MutexGuard<'a, [Pte; ENTRIES]>;

struct Dir<T> {
    slots: Box<[OnceLock<Box<T>>]>,
    /// For a middle-level table (the one whose entries point at last-level tables):
    /// whether it is in use (Linux: the upper-level entry pointing at it is not none).
    /// Set with the first last-level table under it, cleared when `munmap` frees it; the
    /// same rules as [`Leaf::live`].
    live: AtomicBool,
}

impl<T> Dir<T> {
    fn new() -> Self {
        Self {
            slots: (0..ENTRIES).map(|_| OnceLock::new()).collect(),
            live: AtomicBool::new(false),
        }
    }
}

/// The page table of one address space.
pub struct PageTable {
    root: Dir<Dir<Dir<Leaf>>>,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTable")
    }
}

fn idx(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * level)) as usize) & (ENTRIES - 1)
}

/// The index of `va`'s entry in its last-level table.
pub fn pte_index(va: u64) -> usize {
    idx(va, 0)
}

impl PageTable {
    /// An empty page table.
    pub fn new() -> Self {
        Self { root: Dir::new() }
    }

    /// The last-level table covering `va`, if it exists.
    pub fn leaf(&self, va: u64) -> Option<&Leaf> {
        if va >= TASK_SIZE {
            return None;
        }
        let l3 = self.root.slots[idx(va, 3)].get()?;
        let l2 = l3.slots[idx(va, 2)].get()?;
        l2.slots[idx(va, 1)].get().map(|b| &**b)
    }

    /// The last-level table covering `va`, allocating the path to it.
    pub fn leaf_or_alloc(&self, va: u64) -> &Leaf {
        let l3 = self.root.slots[idx(va, 3)].get_or_init(|| Box::new(Dir::new()));
        let l2 = l3.slots[idx(va, 2)].get_or_init(|| Box::new(Dir::new()));
        // Relaxed: as `live` of the leaf below.
        if !l2.live.load(Relaxed) {
            l2.live.store(true, Relaxed);
        }
        let leaf = l2.slots[idx(va, 1)].get_or_init(|| {
            Box::new(Leaf {
                ptes: Mutex::new([Pte::default(); ENTRIES]),
                live: AtomicBool::new(false),
            })
        });
        // Relaxed: ordered with `free_tables` and `first_populated` by the mmap lock.
        if !leaf.live.load(Relaxed) {
            leaf.live.store(true, Relaxed);
        }
        leaf
    }

    /// Frees (marks unused) every last-level table overlapping `[start, end)` that no
    /// mapping overlaps any more (Linux's `free_pgtables` after `munmap`); its entries
    /// are all empty by then. The caller holds the mmap lock for writing.
    pub(crate) fn free_tables(&self, start: u64, end: u64, in_use: impl Fn(u64, u64) -> bool) {
        self.walk_leaves(start, end, |base, leaf, _| {
            if !in_use(base, base + (PAGE_SIZE << 9)) {
                // No mapping overlaps the table, so nothing can have an entry in it: the
                // caller zapped its range, and entries exist only inside mappings.
                debug_assert!(
                    leaf.lock().iter().all(|p| p.is_none()),
                    "freeing a used table"
                );
                leaf.live.store(false, Relaxed);
            }
            ControlFlow::Continue(())
        });
        // The middle-level tables the same way (Linux's `free_pmd_range` frees the table
        // when its whole span lies between the neighbouring mappings).
        self.walk_middle(start, end, |base, dir| {
            if !in_use(base, base + (PAGE_SIZE << 18)) {
                dir.live.store(false, Relaxed);
            }
            ControlFlow::Continue(())
        });
    }

    /// The start of the first middle-level table in use (Linux: the first populated PUD
    /// entry, 1 GiB each) overlapping `[start, end)`, clipped to `start`.
    pub fn first_populated_middle(&self, start: u64, end: u64) -> Option<u64> {
        let mut first = None;
        self.walk_middle(start, end, |base, dir| {
            if !dir.live.load(Relaxed) {
                return ControlFlow::Continue(());
            }
            first = Some(base.max(start));
            ControlFlow::Break(())
        });
        first
    }

    /// Calls `f` with the base and each existing middle-level table overlapping
    /// `[start, end)`, in address order, until it breaks.
    fn walk_middle(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, &Dir<Leaf>) -> ControlFlow<()>,
    ) {
        let end = end.min(TASK_SIZE);
        if start >= end {
            return;
        }
        let span = |level: u32| PAGE_SIZE << (9 * level);
        let last = end - 1;
        for i4 in idx(start, 3)..=idx(last, 3) {
            let Some(l3) = self.root.slots[i4].get() else {
                continue;
            };
            let base3 = i4 as u64 * span(3);
            let s3 = if base3 <= start { idx(start, 2) } else { 0 };
            let e3 = if last < base3 + span(3) {
                idx(last, 2)
            } else {
                ENTRIES - 1
            };
            for i3 in s3..=e3 {
                let Some(l2) = l3.slots[i3].get() else {
                    continue;
                };
                if f(base3 + i3 as u64 * span(2), l2).is_break() {
                    return;
                }
            }
        }
    }

    /// The entry that maps `va`: its page's, or the 2 MiB entry of its table (none when
    /// no table covers it). Takes the page-table lock.
    pub fn pte(&self, va: u64) -> Pte {
        self.leaf(va)
            .map_or(Pte::default(), |l| Leaf::entry(&l.lock(), va))
    }

    /// Calls `f` with each existing last-level table overlapping `[start, end)`, locked,
    /// and the index range of its entries inside `[start, end)`. Skips absent levels, so
    /// walking all of user space costs what is mapped.
    pub fn for_each_leaf(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, &mut LeafGuard<'_>, std::ops::Range<usize>),
    ) {
        self.walk_leaves(start, end, |base, leaf, idx| {
            f(base, &mut leaf.lock(), idx);
            ControlFlow::Continue(())
        });
    }

    /// The start of the first existing last-level table overlapping `[start, end)`,
    /// clipped to `start` (Linux's "first populated entry" at page-table granularity).
    pub fn first_populated(&self, start: u64, end: u64) -> Option<u64> {
        let mut first = None;
        self.walk_leaves(start, end, |base, leaf, _| {
            if !leaf.live.load(Relaxed) {
                return ControlFlow::Continue(());
            }
            first = Some(base.max(start));
            ControlFlow::Break(())
        });
        first
    }

    /// The walk behind [`for_each_leaf`](Self::for_each_leaf): unlocked tables, in address
    /// order, until `f` breaks.
    fn walk_leaves(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, &Leaf, std::ops::Range<usize>) -> ControlFlow<()>,
    ) {
        let end = end.min(TASK_SIZE);
        if start >= end {
            return;
        }
        // Span of one entry at each level: leaf entry, L2, L3, L4.
        let span = |level: u32| PAGE_SIZE << (9 * level);
        let last = end - 1;
        let (s4, e4) = (idx(start, 3), idx(last, 3));
        for i4 in s4..=e4 {
            let Some(l3) = self.root.slots[i4].get() else {
                continue;
            };
            let base3 = i4 as u64 * span(3);
            let s3 = if base3 <= start { idx(start, 2) } else { 0 };
            let e3 = if last < base3 + span(3) {
                idx(last, 2)
            } else {
                ENTRIES - 1
            };
            for i3 in s3..=e3 {
                let Some(l2) = l3.slots[i3].get() else {
                    continue;
                };
                let base2 = base3 + i3 as u64 * span(2);
                let s2 = if base2 <= start { idx(start, 1) } else { 0 };
                let e2 = if last < base2 + span(2) {
                    idx(last, 1)
                } else {
                    ENTRIES - 1
                };
                for i2 in s2..=e2 {
                    let Some(leaf) = l2.slots[i2].get() else {
                        continue;
                    };
                    let base = base2 + i2 as u64 * span(1);
                    let lo = if base <= start { pte_index(start) } else { 0 };
                    let hi = if last < base + span(1) {
                        pte_index(last) + 1
                    } else {
                        ENTRIES
                    };
                    if f(base, leaf, lo..hi).is_break() {
                        return;
                    }
                }
            }
        }
    }
}

impl Leaf {
    /// Takes the page-table lock.
    pub fn lock(&self) -> LeafGuard<'_> {
        self.ptes.lock()
    }

    /// The entry of the locked table `ptes` that maps `va`: the slot of `va`'s page, or,
    /// if the table stands for one 2 MiB entry, that entry (in the first slot).
    pub fn entry(ptes: &[Pte; ENTRIES], va: u64) -> Pte {
        let own = ptes[pte_index(va)];
        if own.is_none() && ptes[0].order() == PageOrder::PMD {
            ptes[0]
        } else {
            own
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_orders_give_sizes_and_spans() {
        assert_eq!(PageOrder::BASE.size(), 4096);
        assert_eq!(PageOrder::PMD.size(), 2 << 20);
        assert_eq!(PageOrder::PMD.pages(), 512);
        assert_eq!(PageOrder::new(9), Some(PageOrder::PMD));
        assert_eq!(PageOrder::new(10), None);
        assert_eq!(
            PageOrder::PMD.span(0x20_3456),
            (0x20_0000, 0x40_0000),
            "the 2 MiB around the address"
        );
        assert_eq!(PageOrder::BASE.span(0x20_3456), (0x20_3000, 0x20_4000));
        assert_eq!(format!("{:?}", PageOrder::PMD), "PageOrder(9 = 2 MiB)");
    }

    #[test]
    fn an_entry_keeps_its_size_through_its_transitions_but_not_into_swap() {
        let huge = Pte::new(Pfn(512), true).with_order(PageOrder::PMD);
        assert_eq!(Pte::new(Pfn(1), true).order(), PageOrder::BASE);
        assert_eq!(huge.order(), PageOrder::PMD);
        assert_eq!(huge.pfn(), Some(Pfn(512)));
        assert!(huge.writable());
        for changed in [
            huge.to_busy(),
            huge.to_exclusive(),
            huge.to_prot_none(),
            huge.to_busy().to_present(Pfn(1024)),
            huge.with_writable(false).old().clean().soft_clean(),
        ] {
            assert_eq!(changed.order(), PageOrder::PMD, "{changed:?}");
        }
        assert_eq!(huge.to_busy().to_present(Pfn(1024)).pfn(), Some(Pfn(1024)));
        assert_eq!(huge.to_swap(3).order(), PageOrder::BASE);
        assert_eq!(huge.to_swap(3).kind(), PteKind::Swap(3));
        assert!(format!("{huge:?}").contains("order 9"), "{huge:?}");
    }

    #[test]
    fn a_table_can_stand_for_one_2mib_entry() {
        let pt = PageTable::new();
        let base = 0x4000_0000;
        let huge = Pte::new(Pfn(512), true).with_order(PageOrder::PMD);
        pt.leaf_or_alloc(base).lock()[0] = huge;
        for va in [base, base + 0x1000, base + 0x1f_f000, base + 0x12_3456] {
            assert_eq!(pt.pte(va), huge, "{va:#x}");
        }
        assert!(
            pt.pte(base + 0x20_0000).is_none(),
            "the next 2 MiB is not mapped"
        );
        // A 4 KiB entry in slot 0 does not stand for the table.
        let small = Pte::new(Pfn(7), true);
        pt.leaf_or_alloc(base).lock()[0] = small;
        assert_eq!(pt.pte(base), small);
        assert!(pt.pte(base + 0x1000).is_none());
    }
}
