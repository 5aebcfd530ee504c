//! Layout changes, under the mmap lock held for writing: `mmap`, `munmap`, `mprotect`,
//! `mremap` and `fork`.

use std::sync::Arc;

use mmu_notifier::{Event, Range};

use super::{advised_range, check_range, AddressSpace, MMAP_MIN_ADDR};
use crate::error::SimError;
use crate::file::File;
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
    pub fn mmap_anon(&self, len: u64, prot: Prot) -> Result<u64, SimError> {
        self.mmap(len, prot, MapKind::AnonPrivate, None)
    }

    /// Linux's `mmap`: maps `len` bytes (rounded up to pages) of `kind` with `prot`, at
    /// the lowest free address, or at exactly `fixed` (`MAP_FIXED`: whatever is mapped
    /// there is unmapped first, with an `Unmap` invalidation). Returns the start.
    ///
    /// Errors as Linux: zero length or an unaligned `fixed` or file offset is EINVAL; a
    /// length that overflows or no room is ENOMEM.
    pub fn mmap(
        &self,
        len: u64,
        prot: Prot,
        kind: MapKind,
        fixed: Option<u64>,
    ) -> Result<u64, SimError> {
        if len == 0 {
            return Err(SimError::InvalidArgument("zero length"));
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|&l| l <= TASK_SIZE)
            .ok_or(SimError::OutOfMemory)?;
        let (shared, backing) = match kind {
            MapKind::AnonPrivate => (false, Backing::Anon),
            MapKind::AnonShared => (
                true,
                Backing::File {
                    file: File::new(self.frames.clone()),
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
                self.unmap_locked(&mut vmas, addr, addr + len, "mmap fixed");
                addr
            }
            None => vmas
                .find_gap(len, MMAP_MIN_ADDR, TASK_SIZE)
                .ok_or(SimError::OutOfMemory)?,
        };
        vmas.insert(Vma {
            start,
            end: start + len,
            prot,
            shared,
            backing,
            anon_vma: Default::default(),
        });
        Ok(start)
    }

    /// Unmaps `[addr, addr + len)` (Linux's `munmap`): one `Unmap` invalidation over the
    /// whole range, across every mapping in it. Unmapping nothing is not an error.
    pub fn munmap(&self, addr: u64, len: u64) -> Result<(), SimError> {
        let end = check_range(addr, len)?;
        let mut vmas = self.mmap.write();
        self.unmap_locked(&mut vmas, addr, end, "munmap");
        Ok(())
    }

    /// Removes the mappings in `[start, end)` and zaps their entries inside one `Unmap`
    /// invalidation over the range (none if nothing is mapped there).
    pub(crate) fn unmap_locked(&self, vmas: &mut VmaMap, start: u64, end: u64, op: &'static str) {
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

    /// Linux's `mprotect`: changes the access allowed to `[addr, addr + len)`. For each
    /// mapping whose protection changes and that has page tables, one `ProtectionVma`
    /// invalidation from its first populated table to its end in the range; entries lose
    /// write permission if the new protection has none (they regain it by faulting).
    ///
    /// A zero length does nothing (as Linux). Errors: EINVAL for an unaligned address,
    /// ENOMEM for a wrapping range or one not entirely mapped (nothing is changed then).
    pub fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<(), SimError> {
        // As Linux: a wrapping or out-of-user-space range has no mapping (ENOMEM).
        let Some(end) = advised_range(addr, len, SimError::OutOfMemory)? else {
            return Ok(());
        };
        if end > TASK_SIZE {
            return Err(SimError::OutOfMemory);
        }
        let mut vmas = self.mmap.write();
        if !vmas.covers(addr, end) {
            return Err(SimError::OutOfMemory);
        }
        vmas.split_at(addr);
        vmas.split_at(end);
        let parts: Vec<(u64, u64)> = vmas
            .overlapping(addr, end)
            .filter(|v| v.prot != prot)
            .map(|v| (v.start, v.end))
            .collect();
        for &(s, e) in &parts {
            vmas.get_mut(s).expect("just listed").prot = prot;
            let Some(first) = self.pt.first_populated(s, e) else {
                continue;
            };
            let inv = self.invalidate(
                Range::new(first, e, Event::ProtectionVma).expect("non-empty"),
                "mprotect",
            );
            // Entries lose what the new protection forbids: all access for PROT_NONE
            // (not present to any hardware walking the table), else write permission;
            // inaccessible entries become readable again (writes fault first).
            self.pt.for_each_leaf(first, e, |_, leaf, idx| {
                for pte in &mut leaf[idx] {
                    match pte.kind() {
                        PteKind::Present(_) if !prot.read => *pte = pte.to_prot_none(),
                        PteKind::Present(_) if !prot.write => *pte = pte.with_writable(false),
                        PteKind::ProtNone(p) if prot.read => *pte = pte.to_present(p),
                        _ => {}
                    }
                }
            });
            inv.flush(first, e);
            drop(inv);
        }
        // Pieces that now match their neighbours become one mapping again, as in Linux.
        for &(s, e) in parts.iter().rev() {
            vmas.merge_at(e);
            vmas.merge_at(s);
        }
        Ok(())
    }

    /// Linux's `mremap`: resizes the mapping at `[old_addr, old_addr + old_len)` to
    /// `new_len`, in place if it can, else moving it (`may_move`), or to `fixed`.
    /// Shrinking unmaps the tail (`Unmap` over it); a move is an `Unmap` invalidation over
    /// the old range while the entries move, then the old range is unmapped (Linux unmaps
    /// the emptied old mapping, which fires a second `Unmap` over it). Returns the new
    /// start.
    ///
    /// Errors as Linux, in Linux's order: EINVAL for an unaligned address, a zero new
    /// length, `fixed` without `may_move`, an unaligned, out-of-range or overlapping
    /// `fixed` target; EFAULT if nothing is mapped at `old_addr` or the old range goes
    /// past its mapping; EINVAL for a zero old length (Linux's duplication of a shared
    /// mapping is not simulated) or a file offset that would overflow; ENOMEM if it
    /// cannot grow and may not move.
    pub fn mremap(
        &self,
        old_addr: u64,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
    ) -> Result<u64, SimError> {
        if old_addr % PAGE_SIZE != 0 {
            return Err(SimError::InvalidArgument("address not page aligned"));
        }
        if new_len == 0 {
            return Err(SimError::InvalidArgument("zero new length"));
        }
        let new_len = new_len
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|&l| l <= TASK_SIZE)
            .ok_or(SimError::InvalidArgument("new length overflows"))?;
        if flags.fixed.is_some() && !flags.may_move {
            return Err(SimError::InvalidArgument(
                "MREMAP_FIXED without MREMAP_MAYMOVE",
            ));
        }
        let fixed = match flags.fixed {
            Some(new_addr) => Some((new_addr, check_range(new_addr, new_len)?)),
            None => None,
        };
        let mut vmas = self.mmap.write();
        let vma = vmas
            .find(old_addr)
            .ok_or(SimError::Fault(old_addr))?
            .clone();
        let old_len = old_len
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|&l| l <= vma.end - old_addr)
            .ok_or(SimError::Fault(vma.end))?;
        if old_len == 0 {
            return Err(SimError::InvalidArgument("zero old length"));
        }
        let old_end = old_addr + old_len;
        if let Backing::File { offset, .. } = &vma.backing {
            (offset + (old_addr - vma.start))
                .checked_add(new_len)
                .ok_or(SimError::InvalidArgument("file offset overflows"))?;
        }
        if let Some((new_addr, new_end)) = fixed {
            if new_addr < old_end && old_addr < new_end {
                return Err(SimError::InvalidArgument("old and new ranges overlap"));
            }
            self.unmap_locked(&mut vmas, new_addr, new_end, "mremap fixed");
            if new_len < old_len {
                self.unmap_locked(&mut vmas, old_addr + new_len, old_end, "mremap shrink");
            }
            self.move_locked(&mut vmas, old_addr, old_len.min(new_len), new_addr, new_len);
            return Ok(new_addr);
        }
        if new_len <= old_len {
            if new_len < old_len {
                self.unmap_locked(&mut vmas, old_addr + new_len, old_end, "mremap shrink");
            }
            return Ok(old_addr);
        }
        let grow_end = old_addr.checked_add(new_len).filter(|&e| e <= TASK_SIZE);
        if let Some(grow_end) = grow_end {
            if old_end == vma.end && vmas.overlapping(old_end, grow_end).next().is_none() {
                vmas.get_mut(vma.start).expect("found").end = grow_end;
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

    /// Moves `[old, old + len)` (inside one mapping) to `new` as a mapping of `new_len`
    /// bytes, entries and all, then unmaps the old range.
    fn move_locked(&self, vmas: &mut VmaMap, old: u64, len: u64, new: u64, new_len: u64) {
        vmas.split_at(old);
        vmas.split_at(old + len);
        let moved = vmas
            .find(old)
            .expect("inside a mapping")
            .moved(new, new_len);
        let inv = self.invalidate(
            Range::new(old, old + len, Event::Unmap).expect("non-empty"),
            "mremap move",
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
        // Linux then unmaps the emptied old mapping (a second `Unmap` over it).
        self.unmap_locked(vmas, old, old + len, "mremap move");
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
                "fork",
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
