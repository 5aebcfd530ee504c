//! Layout changes, under the mmap lock held for writing: `mmap`, `munmap`, `mprotect`,
//! `mremap` and `fork`.

use std::sync::Arc;

use mmu_notifier::{Event, Range};

use super::{advised_range, check_range, AddressSpace, MMAP_MIN_ADDR};
use crate::addr::{Len, VirtAddr};
use crate::error::SimError;
use crate::file::File;
use crate::op::SimOp;
use crate::pagetable::{Pte, PteKind, PAGE_SIZE, TASK_SIZE};
use crate::vma::{Backing, Prot, Vma, VmaMap};

/// What [`AddressSpace::mmap`] maps.
#[derive(Clone, Debug)]
pub enum MapKind {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`: zero-filled, copied on write after `fork`.
    AnonPrivate,
    /// `MAP_SHARED | MAP_ANONYMOUS`: zero-filled, shared with forked children.
    AnonShared,
    /// A file from byte `offset` (page aligned), `MAP_SHARED` or `MAP_PRIVATE`.
    File {
        /// The file.
        file: Arc<File>,
        /// Byte offset in the file of the mapping's first page.
        offset: u64,
        /// `MAP_SHARED` (writes reach the file) or `MAP_PRIVATE` (writes copy the page).
        shared: bool,
    },
}

/// How [`AddressSpace::mremap`] may place the result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MremapFlags {
    /// `MREMAP_MAYMOVE`: may move the mapping if it cannot grow in place.
    pub may_move: bool,
    /// `MREMAP_FIXED` (requires `may_move`): move it to exactly this address, unmapping
    /// whatever is there.
    pub fixed: Option<u64>,
}

impl AddressSpace {
    /// Maps `len` bytes of anonymous private memory with `prot`, at the lowest free
    /// address. Returns its start.
    pub fn mmap_anon(&self, len: impl Into<Len>, prot: Prot) -> Result<u64, SimError> {
        self.mmap(len, prot, MapKind::AnonPrivate, None)
    }

    /// Linux's `mmap`: maps `len` bytes (rounded up to pages) of `kind` with `prot`, at
    /// the lowest free address, or at exactly `fixed` (`MAP_FIXED`: whatever is mapped
    /// there is unmapped first, with an `Unmap` invalidation). Returns the start. The new
    /// mapping merges with compatible neighbours into one mapping, as Linux's does (so a
    /// later per-mapping operation, `madvise` say, makes one range over them). Shared
    /// anonymous memory is an object of `len` bytes: pages past it (after `mremap` grows
    /// the mapping) fault with [`SimError::Bus`].
    ///
    /// Errors as Linux: zero length or an unaligned `fixed` or file offset is EINVAL; a
    /// length that overflows or no room is ENOMEM.
    pub fn mmap(
        &self,
        len: impl Into<Len>,
        prot: Prot,
        kind: MapKind,
        fixed: Option<u64>,
    ) -> Result<u64, SimError> {
        let len = len.into().get();
        if len == 0 {
            return Err(SimError::InvalidArgument("zero length"));
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|&l| l <= TASK_SIZE)
            .ok_or(SimError::OutOfMemory)?;
        let (shared, backing) = match kind {
            MapKind::AnonPrivate => (false, Backing::Anon),
            // Linux backs shared anonymous memory with a shmem object of the mapping's
            // size: pages beyond it (after `mremap` grows the mapping) raise SIGBUS.
            MapKind::AnonShared => (
                true,
                Backing::File {
                    file: File::with_size(self.frames.clone(), len),
                    offset: 0,
                },
            ),
            MapKind::File {
                file,
                offset,
                shared,
            } => {
                if offset % PAGE_SIZE != 0 {
                    return Err(SimError::InvalidArgument("file offset not page aligned"));
                }
                offset
                    .checked_add(len)
                    .ok_or(SimError::InvalidArgument("file offset overflows"))?;
                (shared, Backing::File { file, offset })
            }
        };
        let mut vmas = self.mmap.write();
        let start = match fixed {
            Some(addr) => {
                if addr % PAGE_SIZE != 0 {
                    return Err(SimError::InvalidArgument("address not page aligned"));
                }
                if addr.checked_add(len).map_or(true, |e| e > TASK_SIZE) {
                    return Err(SimError::OutOfMemory);
                }
                self.unmap_locked(&mut vmas, addr, addr + len, SimOp::MmapFixed);
                addr
            }
            None => vmas
                .find_gap(len, MMAP_MIN_ADDR, TASK_SIZE)
                .ok_or(SimError::OutOfMemory)?,
        };
        vmas.insert(Vma::new(start, start + len, prot, shared, backing));
        // A new mapping merges with compatible neighbours, as Linux's `mmap_region` does.
        vmas.merge_around(start, start + len);
        Ok(start)
    }

    /// Unmaps `[addr, addr + len)` (Linux's `munmap`): one `Unmap` invalidation over the
    /// whole range, across every mapping in it. Unmapping nothing is not an error.
    pub fn munmap(&self, addr: impl Into<VirtAddr>, len: impl Into<Len>) -> Result<(), SimError> {
        let addr = addr.into();
        let end = check_range(addr, len.into())?;
        let addr = addr.get();
        let mut vmas = self.mmap.write();
        self.unmap_locked(&mut vmas, addr, end, SimOp::Munmap);
        Ok(())
    }

    /// Removes the mappings in `[start, end)` and zaps their entries inside one `Unmap`
    /// invalidation over the range (none if nothing is mapped there).
    pub(crate) fn unmap_locked(&self, vmas: &mut VmaMap, start: u64, end: u64, op: SimOp) {
        if vmas.overlapping(start, end).next().is_none() {
            return;
        }
        vmas.remove_range(start, end);
        let inv = self.invalidate(Range::new(start, end, Event::Unmap).expect("non-empty"), op);
        self.zap(&inv, start, end);
        drop(inv);
        self.pt
            .free_tables(start, end, |s, e| vmas.overlapping(s, e).next().is_some());
    }

    /// Linux's `mprotect`: changes the access allowed to `[addr, addr + len)`.
    ///
    /// Mappings are taken in address order from the one containing `addr`; each whose
    /// protection changes is split to the range, changed, merged with compatible
    /// neighbours, and, if it has page tables, gets one `ProtectionVma` invalidation from
    /// its first populated upper-level entry (see below) to its end in the range;
    /// entries lose write permission if the new protection has none (they regain it by
    /// faulting). A mapping whose protection already matches is left whole (no split, no
    /// invalidation). At the first hole the walk stops with ENOMEM, the mappings before
    /// it changed (as Linux); nothing changes only when `addr` itself is unmapped.
    ///
    /// Where the invalidation starts: Linux 6.12 and later (as simulated) start it at the
    /// first populated entry of the level whose entries each cover 1 GiB (a PUD entry:
    /// a middle-level table exists under it), clipped to the call's start; Linux 6.10
    /// started at the first populated 2 MiB entry (a last-level table exists). One
    /// invalidation per 512 GiB top-level entry the mapping spans.
    ///
    /// A zero length does nothing (as Linux). Errors: EINVAL for an unaligned address,
    /// ENOMEM for a wrapping range or one not entirely mapped.
    pub fn mprotect(
        &self,
        addr: impl Into<VirtAddr>,
        len: impl Into<Len>,
        prot: Prot,
    ) -> Result<(), SimError> {
        let addr = addr.into();
        // As Linux: a wrapping or out-of-user-space range has no mapping (ENOMEM).
        let Some(end) = advised_range(addr, len.into(), SimError::OutOfMemory)? else {
            return Ok(());
        };
        let addr = addr.get();
        if end > TASK_SIZE {
            return Err(SimError::OutOfMemory);
        }
        let mut vmas = self.mmap.write();
        let parts: Vec<(u64, u64, Prot)> = vmas
            .overlapping(addr, end)
            .map(|v| (v.start.max(addr), v.end.min(end), v.prot))
            .collect();
        let mut done = addr;
        for (s, e, old) in parts {
            if s > done {
                // A hole: the mappings before it stay changed.
                return Err(SimError::OutOfMemory);
            }
            done = e;
            if old == prot {
                continue;
            }
            vmas.split_at(s);
            vmas.split_at(e);
            vmas.get_mut(s).expect("just split").set_prot(prot);
            self.protect_entries(s, e, prot);
            vmas.merge_modified(s, e);
        }
        if done < end {
            return Err(SimError::OutOfMemory);
        }
        Ok(())
    }

    /// The page-table half of `mprotect` for `[s, e)` inside one mapping: per 512 GiB
    /// top-level entry, a `ProtectionVma` invalidation from the first populated 1 GiB
    /// entry (clipped to `s`) to the end, while the entries are changed.
    fn protect_entries(&self, s: u64, e: u64, prot: Prot) {
        const TOP: u64 = PAGE_SIZE << 27;
        let mut chunk = s;
        while chunk < e {
            let chunk_end = ((chunk / TOP) + 1).saturating_mul(TOP).min(e);
            let from = chunk;
            chunk = chunk_end;
            let Some(first) = self.pt.first_populated_middle(from, chunk_end) else {
                continue;
            };
            let inv = self.invalidate(
                Range::new(first, chunk_end, Event::ProtectionVma).expect("non-empty"),
                SimOp::Mprotect,
            );
            // Entries lose what the new protection forbids: all access for PROT_NONE
            // (not present to any hardware walking the table), else write permission;
            // inaccessible entries become readable again (writes fault first).
            self.pt.for_each_leaf(first, chunk_end, |_, leaf, idx| {
                for pte in &mut leaf[idx] {
                    match pte.kind() {
                        PteKind::Present(_) if !prot.read => *pte = pte.to_prot_none(),
                        PteKind::Present(_) if !prot.write => *pte = pte.with_writable(false),
                        PteKind::ProtNone(p) if prot.read => *pte = pte.to_present(p),
                        _ => {}
                    }
                }
            });
            inv.flush(first, chunk_end);
            drop(inv);
        }
    }

    /// Linux's `mremap`: resizes the mapping at `[old_addr, old_addr + old_len)` to
    /// `new_len`, in place if it can, else moving it (`may_move`), or to `fixed`.
    /// Shrinking unmaps the tail (`Unmap` over it); a move is an `Unmap` invalidation over
    /// the old range while the entries move, then the old range is unmapped (Linux unmaps
    /// the emptied old mapping, which fires a second `Unmap` over it). A mapping grown in
    /// place or moved merges with compatible neighbours. Returns the new start.
    ///
    /// The order is Linux 6.18's:
    /// 1. Arguments, before any lookup (EINVAL): an unaligned address, a zero new length;
    ///    with `fixed`: an unaligned target, no `may_move`, old and new ranges that
    ///    overlap, a target beyond user space.
    /// 2. `fixed` with equal lengths is a pure move, which since Linux 6.17 may span
    ///    several mappings: every mapping in the old range moves, one after the other,
    ///    keeping the gaps between them (EFAULT if `old_addr` itself is unmapped).
    /// 3. Otherwise EFAULT if nothing is mapped at `old_addr`. Without `fixed`, a shrink
    ///    just unmaps the tail `[old_addr + new_len, old_addr + old_len)`, wherever it
    ///    reaches, and equal lengths are done at once.
    /// 4. Growing or moving, before anything is unmapped: EINVAL for a zero old length
    ///    (Linux's duplication of a shared mapping is not simulated); EFAULT if the part
    ///    that stays mapped (the old range, or its first `new_len` bytes when shrinking)
    ///    goes past its mapping; EINVAL for a file offset that would overflow.
    /// 5. With `fixed`, the target is unmapped, then the tail, then the move; else the
    ///    mapping grows in place if it ends the old range and has room, else moves
    ///    (`may_move`), else ENOMEM.
    pub fn mremap(
        &self,
        old_addr: impl Into<VirtAddr>,
        old_len: impl Into<Len>,
        new_len: impl Into<Len>,
        flags: MremapFlags,
    ) -> Result<u64, SimError> {
        let (old_addr, old_len, new_len) = (
            old_addr.into().get(),
            old_len.into().get(),
            new_len.into().get(),
        );
        if old_addr % PAGE_SIZE != 0 {
            return Err(SimError::InvalidArgument("address not page aligned"));
        }
        let new_len = new_len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(SimError::InvalidArgument("new length overflows"))?;
        if new_len == 0 {
            return Err(SimError::InvalidArgument("zero new length"));
        }
        // As Linux's PAGE_ALIGN: a length that wraps when rounded reads as zero.
        let old_len = old_len.checked_next_multiple_of(PAGE_SIZE).unwrap_or(0);
        if let Some(new_addr) = flags.fixed {
            if new_addr % PAGE_SIZE != 0 {
                return Err(SimError::InvalidArgument("target not page aligned"));
            }
            if !flags.may_move {
                return Err(SimError::InvalidArgument(
                    "MREMAP_FIXED without MREMAP_MAYMOVE",
                ));
            }
            let old_end = old_addr.saturating_add(old_len);
            let new_end = new_addr.saturating_add(new_len);
            if new_addr < old_end && old_addr < new_end {
                return Err(SimError::InvalidArgument("old and new ranges overlap"));
            }
            if new_len > TASK_SIZE || new_addr > TASK_SIZE - new_len {
                return Err(SimError::InvalidArgument("target beyond user space"));
            }
        }
        let mut vmas = self.mmap.write();
        if let Some(new_addr) = flags.fixed {
            if old_len == new_len {
                return self.remap_move(&mut vmas, old_addr, old_len, new_addr);
            }
        }
        let vma = vmas
            .find(old_addr)
            .ok_or(SimError::Fault(old_addr))?
            .clone();
        if flags.fixed.is_none() && new_len <= old_len {
            self.shrink_locked(&mut vmas, old_addr, old_len, new_len)?;
            return Ok(old_addr);
        }
        // Growing or moving: the old range must lie in its mapping; a shrink that also
        // moves may unmap past it (only the part that moves must).
        self.remap_check(&vma, old_addr, old_len.min(new_len), old_len, new_len)?;
        if let Some(new_addr) = flags.fixed {
            self.unmap_locked(&mut vmas, new_addr, new_addr + new_len, SimOp::MremapFixed);
            vmas.find(old_addr).ok_or(SimError::Fault(old_addr))?;
            let len = if new_len < old_len {
                self.shrink_locked(&mut vmas, old_addr, old_len, new_len)?;
                new_len
            } else {
                old_len
            };
            self.move_locked(&mut vmas, old_addr, len, new_addr, new_len);
            return Ok(new_addr);
        }
        let old_end = old_addr + old_len;
        let grow_end = old_addr.checked_add(new_len).filter(|&e| e <= TASK_SIZE);
        if let Some(grow_end) = grow_end {
            if old_end == vma.end && vmas.overlapping(old_end, grow_end).next().is_none() {
                vmas.get_mut(vma.start).expect("found").end = grow_end;
                vmas.merge_at(grow_end);
                return Ok(old_addr);
            }
        }
        if !flags.may_move {
            return Err(SimError::OutOfMemory);
        }
        let new_addr = vmas
            .find_gap(new_len, MMAP_MIN_ADDR, TASK_SIZE)
            .ok_or(SimError::OutOfMemory)?;
        self.move_locked(&mut vmas, old_addr, old_len, new_addr, new_len);
        Ok(new_addr)
    }

    /// The shrink step of `mremap`: unmaps the tail (nothing if the lengths are equal),
    /// with `munmap`'s checks (EINVAL for a tail beyond user space).
    fn shrink_locked(
        &self,
        vmas: &mut VmaMap,
        addr: u64,
        old_len: u64,
        new_len: u64,
    ) -> Result<(), SimError> {
        if new_len < old_len {
            let tail = addr
                .checked_add(new_len)
                .ok_or(SimError::InvalidArgument("range overflows"))?;
            let end = check_range(VirtAddr::new(tail), Len::new(old_len - new_len))?;
            self.unmap_locked(vmas, tail, end, SimOp::MremapShrink);
        }
        Ok(())
    }

    /// The checks before `mremap` grows or moves (Linux's `check_prep_vma`), before
    /// anything is unmapped: EINVAL for a zero old length, EFAULT if the `moving` bytes
    /// from `addr` go past the mapping, EINVAL if a resize would overflow the offset.
    fn remap_check(
        &self,
        vma: &Vma,
        addr: u64,
        moving: u64,
        old_len: u64,
        new_len: u64,
    ) -> Result<(), SimError> {
        if old_len == 0 {
            return Err(SimError::InvalidArgument("zero old length"));
        }
        if moving > vma.end - addr {
            return Err(SimError::Fault(vma.end));
        }
        if let Backing::File { offset, .. } = &vma.backing {
            if new_len != moving {
                (offset + (addr - vma.start))
                    .checked_add(new_len)
                    .ok_or(SimError::InvalidArgument("file offset overflows"))?;
            }
        }
        Ok(())
    }

    /// A pure move of `[addr, addr + len)` to `new_addr` (`MREMAP_FIXED`, equal lengths;
    /// Linux 6.17+): each mapping in the range moves in turn, as a separate move with its
    /// own target unmap, keeping the gaps between the mappings. The first page must be
    /// mapped (EFAULT otherwise, and if nothing is).
    fn remap_move(
        &self,
        vmas: &mut VmaMap,
        addr: u64,
        len: u64,
        new_addr: u64,
    ) -> Result<u64, SimError> {
        let end = addr.saturating_add(len);
        let mut cursor = addr;
        let mut target = new_addr;
        let mut last_end = None;
        loop {
            let Some(vma) = vmas.overlapping(cursor, end).next().cloned() else {
                break;
            };
            let s = vma.start.max(addr);
            let e = vma.end.min(end);
            if last_end.is_none() && addr < vma.start {
                return Err(SimError::Fault(addr));
            }
            let to = target + last_end.map_or(0, |l| vma.start - l);
            last_end = Some(vma.end);
            self.unmap_locked(vmas, to, to + (e - s), SimOp::MremapFixed);
            self.move_locked(vmas, s, e - s, to, e - s);
            target = to + (e - s);
            cursor = e;
        }
        if last_end.is_none() {
            return Err(SimError::Fault(addr));
        }
        Ok(new_addr)
    }

    /// Moves `[old, old + len)` (inside one mapping) to `new` as a mapping of `new_len`
    /// bytes, entries and all, merging it with compatible neighbours there, then unmaps
    /// the old range.
    fn move_locked(&self, vmas: &mut VmaMap, old: u64, len: u64, new: u64, new_len: u64) {
        vmas.split_at(old);
        vmas.split_at(old + len);
        let moved = vmas
            .find(old)
            .expect("inside a mapping")
            .moved(new, new_len);
        let inv = self.invalidate(
            Range::new(old, old + len, Event::Unmap).expect("non-empty"),
            SimOp::MremapMove,
        );
        let mut entries: Vec<(u64, Pte)> = Vec::new();
        self.pt.for_each_leaf(old, old + len, |base, leaf, idx| {
            for i in idx {
                if !leaf[i].is_none() {
                    entries.push((base + i as u64 * PAGE_SIZE - old, leaf[i]));
                    leaf[i] = Pte::default();
                }
            }
        });
        for &(off, pte) in &entries {
            let va = new + off;
            self.pt.leaf_or_alloc(va).lock()[crate::pagetable::pte_index(va)] = pte;
        }
        if !entries.is_empty() {
            inv.flush(old, old + len);
        }
        drop(inv);
        vmas.insert(moved);
        vmas.merge_around(new, new + new_len);
        // Linux then unmaps the emptied old mapping (a second `Unmap` over it).
        self.unmap_locked(vmas, old, old + len, SimOp::MremapMove);
    }

    /// Linux's `fork`: a new address space with a copy of every mapping. Shared mappings
    /// are refaulted by the child. Private mappings with entries are copied on write: a
    /// `ProtectionPage` invalidation over the whole mapping on the parent while its
    /// entries are write-protected and shared with the child.
    ///
    /// As Linux, only private mappings in which an anonymous page was ever created (they
    /// have an `anon_vma`) are copied; the child refaults the others from the zero page or
    /// the page cache.
    pub fn fork(&self) -> Arc<AddressSpace> {
        let vmas = self.mmap.write();
        let child = AddressSpace::build(self.frames.clone(), self.notify);
        let mut child_vmas = child.mmap.write();
        for vma in vmas.iter() {
            child_vmas.insert(vma.fork_copy());
            if !vma.is_cow() || !vma.has_anon_vma() {
                continue;
            }
            let inv = self.invalidate(
                Range::new(vma.start, vma.end, Event::ProtectionPage).expect("non-empty"),
                SimOp::Fork,
            );
            let mut copied: Vec<(u64, Pte)> = Vec::new();
            self.pt
                .for_each_leaf(vma.start, vma.end, |base, leaf, idx| {
                    for i in idx {
                        let pte = leaf[i];
                        let va = base + i as u64 * PAGE_SIZE;
                        let child_pte = match pte.kind() {
                            PteKind::None => continue,
                            PteKind::Present(p) => {
                                self.frames.get(p);
                                leaf[i] = pte.with_writable(false);
                                leaf[i]
                            }
                            PteKind::Exclusive(p) => {
                                // The device keeps the parent's page; the child shares it
                                // read-only, so the parent's entry must copy on write too.
                                self.frames.get(p);
                                leaf[i] = pte.with_writable(false);
                                pte.to_present(p).with_writable(false)
                            }
                            PteKind::Swap(s) => {
                                self.frames.swap_dup(s);
                                pte
                            }
                            PteKind::ProtNone(p) => {
                                self.frames.get(p);
                                pte
                            }
                            // Entries are busy only under the mmap lock held for reading,
                            // which fork excludes.
                            PteKind::Busy(_) => continue,
                        };
                        copied.push((va, child_pte));
                    }
                });
            for (va, pte) in copied {
                child.pt.leaf_or_alloc(va).lock()[crate::pagetable::pte_index(va)] = pte;
            }
            inv.flush(vma.start, vma.end);
            drop(inv);
        }
        drop(child_vmas);
        child
    }
}
