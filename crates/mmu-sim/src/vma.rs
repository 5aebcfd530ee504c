//! Virtual memory areas: the layout half of an address space.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use crate::file::File;
use crate::pagetable::PAGE_SIZE;

/// Access a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Prot {
    /// No access (`PROT_NONE`).
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
    };
    /// `PROT_READ`.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// `PROT_READ | PROT_WRITE`.
    pub const READ_WRITE: Prot = Prot {
        read: true,
        write: true,
    };
}

/// What a mapping's pages come from.
#[derive(Clone, Debug)]
pub enum Backing {
    /// Anonymous memory: zero-filled on first use.
    Anon,
    /// A file's page cache, from byte `offset` at the mapping's start. Shared anonymous
    /// memory is a mapping of an unnamed file, as in Linux.
    File {
        /// The file.
        file: Arc<File>,
        /// Byte offset of the mapping's first page in the file.
        offset: u64,
    },
}

/// One mapping `[start, end)`.
#[derive(Clone, Debug)]
pub struct Vma {
    /// First address (page aligned).
    pub start: u64,
    /// One past the last address (page aligned).
    pub end: u64,
    /// Allowed access.
    pub prot: Prot,
    /// `MAP_SHARED` (writes go to the backing pages) rather than `MAP_PRIVATE` (writes
    /// copy them first).
    pub shared: bool,
    /// Where the pages come from.
    pub backing: Backing,
    /// For anonymous memory, the page offset the mapping's first page had when it was
    /// created (Linux's `vm_pgoff`: the address in pages at `mmap` time). Two anonymous
    /// mappings merge only if their offsets continue each other.
    pub(crate) pgoff: u64,
    /// Whether the mapping's memory is charged as committed (Linux's `VM_ACCOUNT`): set
    /// for a private mapping created writable or later made writable, and kept when the
    /// write permission goes (but for anonymous memory without an `anon_vma`). Mappings
    /// merge only if they agree on it.
    pub(crate) accounted: bool,
    /// The mapping's `anon_vma` (Linux), created by the first private anonymous page:
    /// empty until then. Its identity is the inner `Arc`; pieces split after it exists
    /// share it, pieces split before get their own empty one.
    pub(crate) anon_vma: Arc<OnceLock<Arc<()>>>,
}

impl PartialEq for Vma {
    fn eq(&self, o: &Self) -> bool {
        let same_backing = match (&self.backing, &o.backing) {
            (Backing::Anon, Backing::Anon) => true,
            (Backing::File { file: a, offset: x }, Backing::File { file: b, offset: y }) => {
                Arc::ptr_eq(a, b) && x == y
            }
            _ => false,
        };
        self.start == o.start
            && self.end == o.end
            && self.prot == o.prot
            && self.shared == o.shared
            && same_backing
    }
}

impl Eq for Vma {}

impl Vma {
    /// The file and page index backing `addr` (inside the mapping), if file backed.
    pub fn file_page(&self, addr: u64) -> Option<(&Arc<File>, u64)> {
        match &self.backing {
            Backing::Anon => None,
            Backing::File { file, offset } => {
                Some((file, (offset + (addr - self.start)) / PAGE_SIZE))
            }
        }
    }

    /// Whether a private anonymous page was ever created in this mapping (Linux: it has
    /// an `anon_vma`); `fork` copies only such private mappings.
    pub fn has_anon_vma(&self) -> bool {
        self.anon_vma.get().is_some()
    }

    /// A new mapping's layout fields with no `anon_vma` yet.
    pub(crate) fn new(start: u64, end: u64, prot: Prot, shared: bool, backing: Backing) -> Vma {
        Vma {
            start,
            end,
            prot,
            shared,
            backing,
            pgoff: start / PAGE_SIZE,
            accounted: !shared && prot.write,
            anon_vma: Default::default(),
        }
    }

    /// Changes the protection as `mprotect` does: a private mapping made writable
    /// becomes accounted, and stays so, except anonymous memory that never had a page
    /// (no `anon_vma`), which is unaccounted again when it loses write permission.
    pub(crate) fn set_prot(&mut self, prot: Prot) {
        self.prot = prot;
        if prot.write && !self.shared {
            self.accounted = true;
        } else if !prot.write && matches!(self.backing, Backing::Anon) && !self.has_anon_vma() {
            self.accounted = false;
        }
    }

    /// Gives the mapping an `anon_vma` before its first private anonymous page (Linux's
    /// `anon_vma_prepare`): a neighbour's is reused if the neighbour is adjacent, of the
    /// same kind (access rights aside) and continues its offsets, else a new one. The
    /// `OnceLock` makes concurrent faults (under the mmap lock held for reading) agree.
    pub(crate) fn prepare_anon(&self, vmas: &VmaMap) {
        if self.has_anon_vma() {
            return;
        }
        let reusable = |a: &Vma, b: &Vma| {
            a.end == b.start
                && a.shared == b.shared
                && a.accounted == b.accounted
                && a.same_object(b)
                && a.pgoff_at(b.start).is_some()
                && a.pgoff_at(b.start) == b.pgoff_at(b.start)
        };
        let next = vmas
            .find(self.end)
            .filter(|n| reusable(self, n))
            .and_then(|n| n.anon_vma.get().cloned());
        let prev = || {
            self.start
                .checked_sub(1)
                .and_then(|a| vmas.find(a))
                .filter(|p| reusable(p, self))
                .and_then(|p| p.anon_vma.get().cloned())
        };
        let chosen = next.or_else(prev).unwrap_or_default();
        let _ = self.anon_vma.set(chosen);
    }

    /// Records that a private anonymous page is being created in the mapping (a new
    /// `anon_vma` if [`prepare_anon`](Self::prepare_anon) did not run).
    pub(crate) fn mark_anon(&self) {
        self.anon_vma.get_or_init(Default::default);
    }

    /// A copy for a forked child: same layout, its own `anon_vma` if this one has one.
    pub(crate) fn fork_copy(&self) -> Vma {
        let anon_vma = Arc::new(OnceLock::new());
        if self.has_anon_vma() {
            let _ = anon_vma.set(Arc::new(()));
        }
        Vma {
            anon_vma,
            ..self.clone()
        }
    }

    /// Whether both map the same object: anonymous memory, or the same file.
    fn same_object(&self, o: &Vma) -> bool {
        match (&self.backing, &o.backing) {
            (Backing::Anon, Backing::Anon) => true,
            (Backing::File { file: a, .. }, Backing::File { file: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The page offset (in the file, or Linux's `vm_pgoff` for anonymous memory) that
    /// `addr` has in this mapping, extrapolated outside it; `None` on overflow.
    fn pgoff_at(&self, addr: u64) -> Option<u64> {
        let first = match &self.backing {
            Backing::Anon => self.pgoff,
            Backing::File { offset, .. } => offset / PAGE_SIZE,
        };
        if addr >= self.start {
            first.checked_add((addr - self.start) / PAGE_SIZE)
        } else {
            first.checked_sub((self.start - addr) / PAGE_SIZE)
        }
    }

    /// Whether `next` (which starts where this ends) could be the same mapping: same
    /// protection, sharing and object, offsets continuing (for anonymous memory too, as
    /// Linux compares `vm_pgoff`), and compatible `anon_vma`s (the same one, or at most
    /// one of them has one).
    pub(crate) fn can_merge(&self, next: &Vma) -> bool {
        let anon = match (self.anon_vma.get(), next.anon_vma.get()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => true,
        };
        self.end == next.start
            && self.prot == next.prot
            && self.shared == next.shared
            && self.accounted == next.accounted
            && self.same_object(next)
            && self.pgoff_at(next.start).is_some()
            && self.pgoff_at(next.start) == next.pgoff_at(next.start)
            && anon
    }

    /// Whether this is a private mapping whose pages are copied on write (Linux's
    /// `is_cow_mapping`: every private mapping may be made writable).
    pub fn is_cow(&self) -> bool {
        !self.shared
    }

    /// The part of this mapping from `at` on (`at` inside it).
    fn tail(&self, at: u64) -> Vma {
        let backing = match &self.backing {
            Backing::Anon => Backing::Anon,
            Backing::File { file, offset } => Backing::File {
                file: file.clone(),
                offset: offset + (at - self.start),
            },
        };
        // An `anon_vma` that exists is shared by both pieces; one that does not yet will
        // be created separately for each.
        let anon_vma = if self.has_anon_vma() {
            self.anon_vma.clone()
        } else {
            Arc::new(OnceLock::new())
        };
        Vma {
            start: at,
            backing,
            pgoff: self.pgoff + (at - self.start) / PAGE_SIZE,
            anon_vma,
            ..self.clone()
        }
    }

    /// This mapping moved to start at `new_start` with length `len` (Linux's `copy_vma`):
    /// the same object and offsets, except that anonymous memory without an `anon_vma`
    /// takes the offset of its new address, as if mapped there.
    pub(crate) fn moved(&self, new_start: u64, len: u64) -> Vma {
        let pgoff = if matches!(self.backing, Backing::Anon) && !self.has_anon_vma() {
            new_start / PAGE_SIZE
        } else {
            self.pgoff
        };
        Vma {
            start: new_start,
            end: new_start + len,
            pgoff,
            ..self.clone()
        }
    }
}

/// The mappings of an address space, by start address; they never overlap.
#[derive(Clone, Debug, Default)]
pub struct VmaMap {
    vmas: BTreeMap<u64, Vma>,
}

impl VmaMap {
    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// Mappings overlapping `[start, end)`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        let first = self.find(start).map_or(start, |v| v.start);
        self.vmas
            .range(first..end)
            .map(|(_, v)| v)
            .filter(move |v| v.end > start)
    }

    /// Adds a mapping; the caller makes sure the range is free.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.start, vma.end).next().is_none());
        self.vmas.insert(vma.start, vma);
    }

    /// Splits the mapping containing `addr` (if any, and if `addr` is inside it) in two.
    pub fn split_at(&mut self, addr: u64) {
        let Some(v) = self.find(addr).cloned() else {
            return;
        };
        if v.start == addr {
            return;
        }
        self.vmas.insert(addr, v.tail(addr));
        self.vmas.insert(v.start, Vma { end: addr, ..v });
    }

    /// Removes every mapping inside `[start, end)` (split at both ends first), returning
    /// them.
    pub fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.vmas.range(start..end).map(|(k, _)| *k).collect();
        keys.iter().filter_map(|k| self.vmas.remove(k)).collect()
    }

    /// The lowest free gap of `len` bytes at or above `floor` and below `ceiling`.
    pub fn find_gap(&self, len: u64, floor: u64, ceiling: u64) -> Option<u64> {
        let mut candidate = floor;
        for v in self.vmas.values() {
            if v.end <= candidate {
                continue;
            }
            if v.start >= candidate && v.start - candidate >= len {
                break;
            }
            candidate = candidate.max(v.end);
        }
        (candidate.checked_add(len)? <= ceiling).then_some(candidate)
    }

    /// The mapping starting at `start`, to change in place (the caller keeps the map
    /// ordered and non-overlapping).
    pub(crate) fn get_mut(&mut self, start: u64) -> Option<&mut Vma> {
        self.vmas.get_mut(&start)
    }

    /// Merges the mapping starting at `at` into the one ending there, if they are
    /// compatible (Linux's `vma_merge`).
    pub(crate) fn merge_at(&mut self, at: u64) {
        let Some(next) = self.vmas.get(&at) else {
            return;
        };
        let Some((_, prev)) = self.vmas.range(..at).next_back() else {
            return;
        };
        if !prev.can_merge(next) {
            return;
        }
        let next = self.vmas.remove(&at).expect("present");
        let prev_start = self.find(at - 1).expect("adjacent").start;
        let prev = self.vmas.get_mut(&prev_start).expect("present");
        if next.has_anon_vma() {
            prev.anon_vma = next.anon_vma.clone();
        }
        prev.end = next.end;
    }

    /// Merges the new mapping `[start, end)` with compatible neighbours on both sides,
    /// the one before first (Linux prefers it when only one side can merge).
    pub(crate) fn merge_around(&mut self, start: u64, end: u64) {
        self.merge_at(start);
        self.merge_at(end);
    }

    /// Merges the existing mapping `[start, end)` whose flags just changed (`mprotect`)
    /// with compatible neighbours, as Linux 6.18 merges an existing range: on top of
    /// [`Vma::can_merge`], a mapping that has an `anon_vma` never merges into a
    /// neighbour that has none (Linux does not move the `anon_vma` over in that case;
    /// the other way round, and for new or moved mappings, it does).
    pub(crate) fn merge_modified(&mut self, start: u64, end: u64) {
        let Some(src) = self.vmas.get(&start).map(|v| v.anon_vma.get().cloned()) else {
            return;
        };
        let allowed = |tgt: &Vma| match (tgt.anon_vma.get(), &src) {
            (None, Some(_)) => false,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => true,
        };
        if start > 0 && self.find(start - 1).is_some_and(&allowed) {
            self.merge_at(start);
        }
        if self.vmas.get(&end).is_some_and(&allowed) {
            self.merge_at(end);
        }
    }

    /// Whether `[start, end)` is entirely covered by mappings.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for v in self.overlapping(start, end) {
            if v.start > at {
                return false;
            }
            at = v.end;
        }
        at >= end
    }

    /// All mappings, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.vmas.len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.vmas.is_empty()
    }
}
