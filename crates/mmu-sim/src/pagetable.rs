//! A four-level page table (9 bits per level, 4 KiB pages, 48-bit addresses). Interior
//! levels are allocated lazily and never freed (like Linux, which frees page tables only
//! in `free_pgtables`); each last-level table has its own lock, the *page-table lock*, so
//! faults on different 2 MiB regions run in parallel.

use std::sync::OnceLock;

use parking_lot::{Mutex, MutexGuard};

use crate::frame::Pfn;

/// Bytes in a page.
pub const PAGE_SIZE: u64 = 4096;
/// The first address above user space (48-bit, like x86-64 with 4-level paging).
pub const TASK_SIZE: u64 = 1 << 47;
const ENTRIES: usize = 512;

/// A page-table entry: flag bits and a frame number.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pte(u64);

impl Pte {
    const PRESENT: u64 = 1 << 0;
    const WRITABLE: u64 = 1 << 1;
    const ACCESSED: u64 = 1 << 2;
    const DIRTY: u64 = 1 << 3;
    const SOFT_DIRTY: u64 = 1 << 4;

    /// A present entry for `pfn`.
    pub fn new(pfn: Pfn, writable: bool) -> Self {
        let mut p = Pte(((pfn.0 as u64) << 32) | Self::PRESENT);
        p.set(Self::WRITABLE, writable);
        p
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
    /// Marks an access (and a write, which also sets dirty and soft-dirty).
    pub fn touch(&mut self, write: bool) {
        self.set(Self::ACCESSED, true);
        if write {
            self.set(Self::DIRTY, true);
            self.set(Self::SOFT_DIRTY, true);
        }
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pfn() {
            None => write!(f, "Pte(none)"),
            Some(p) => write!(
                f,
                "Pte({:?}{}{}{}{})",
                p,
                if self.writable() { " W" } else { " RO" },
                if self.accessed() { " A" } else { "" },
                if self.dirty() { " D" } else { "" },
                if self.soft_dirty() { " SD" } else { "" },
            ),
        }
    }
}

/// A last-level table: 512 entries behind the page-table lock.
pub struct Leaf {
    ptes: Mutex<[Pte; ENTRIES]>,
}

/// A held page-table lock over one last-level table.
pub type LeafGuard<'a> = MutexGuard<'a, [Pte; ENTRIES]>;

struct Dir<T> {
    slots: Box<[OnceLock<Box<T>>]>,
}

impl<T> Dir<T> {
    fn new() -> Self {
        Self {
            slots: (0..ENTRIES).map(|_| OnceLock::new()).collect(),
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
        let l3 = self.root.slots[idx(va, 3)].get()?;
        let l2 = l3.slots[idx(va, 2)].get()?;
        l2.slots[idx(va, 1)].get().map(|b| &**b)
    }

    /// The last-level table covering `va`, allocating the path to it.
    pub fn leaf_or_alloc(&self, va: u64) -> &Leaf {
        let l3 = self.root.slots[idx(va, 3)].get_or_init(|| Box::new(Dir::new()));
        let l2 = l3.slots[idx(va, 2)].get_or_init(|| Box::new(Dir::new()));
        l2.slots[idx(va, 1)].get_or_init(|| {
            Box::new(Leaf {
                ptes: Mutex::new([Pte::default(); ENTRIES]),
            })
        })
    }

    /// The entry for `va` (none when no table covers it). Takes the page-table lock.
    pub fn pte(&self, va: u64) -> Pte {
        self.leaf(va)
            .map_or(Pte::default(), |l| l.lock()[pte_index(va)])
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
                    f(base, &mut leaf.lock(), lo..hi);
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
}
