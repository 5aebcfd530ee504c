//! # mmu-sim
//!
//! A software primary MMU: an address space with VMAs, a four-level page table with
//! per-table locks, and a frame pool with reference counts and generations, whose
//! operations call the [`mmu_notifier`] subsystem exactly where Linux does (the event,
//! the range, the blockable flag, and the order against page-table changes and frees).
//!
//! - Layout ([`AddressSpace::mmap`] of anonymous private/shared and file-backed memory
//!   through a small page cache ([`File`]), `munmap`, `mprotect`, `mremap`, `fork` with
//!   copy-on-write, exit) under the mmap lock held for writing.
//! - Pages (faults with COW breaks, get-user-pages without pinning, the per-page
//!   [`snapshot`](AddressSpace::snapshot) of `hmm_range_fault`, `madvise` DONTNEED/FREE,
//!   reclaim with aging and swap, migration, soft-dirty reset, device-exclusive access and
//!   its restore, the OOM reaper) under the mmap lock held for reading, with per-table
//!   page-table locks, so they run in parallel.
//! - The [`Checker`]: secondaries report their installs and make their accesses through
//!   it, the primary reports its invalidation windows and flushes, and every stale
//!   translation, use-after-free and lost write is counted with its operation, address,
//!   secondary and seed.
//!
//! The module docs of `mm` (see [`AddressSpace`]) state the locking and ordering rules.
//!
//! Calls take addresses as [`VirtAddr`] and lengths as [`Len`] (or plain `u64`s, which
//! convert to either), so that typed callers cannot pass an end where a length belongs.
//!
//! # Which Linux
//! The simulation follows Linux 6.18, checked against it operation by operation: the
//! `mmu-oracle` crate runs the same scripts on the running kernel (observing its notifier
//! calls through KVM's tracepoints) and here, and compares every range. Where 6.18
//! behaves differently from 6.10:
//! - `mprotect` starts its `ProtectionVma` range at the first populated entry of the
//!   1 GiB level (a PUD entry), clipped to the call, since 6.12; 6.10 started at the
//!   first populated 2 MiB entry.
//! - `mremap` (rewritten in 6.16-6.18): arguments, including overlapping old and new
//!   ranges, are checked before the mapping is looked up; a grow or move is checked
//!   before anything is unmapped; a pure `MREMAP_FIXED` move (equal lengths) may span
//!   several mappings with gaps between them since 6.17 (6.16 and earlier: EFAULT).
//! - Merging (the merge code was rewritten after 6.10): a mapping whose flags change
//!   and that has an `anon_vma` does not merge into a neighbour without one.
//!
//! And as every recent Linux does: new, moved and grown mappings merge with compatible
//! neighbours (same protection, sharing, object, continuing offsets, accounting and
//! compatible `anon_vma`); an `anon_vma` is shared by split pieces only if it existed at
//! the split (a later first write may adopt an adjacent compatible mapping's); `mprotect`
//! leaves mappings that already have the protection whole and, at a hole, keeps what it
//! changed before it and fails with ENOMEM; reclaim and migration take `PROT_NONE` pages
//! like any mapped page; shared anonymous memory keeps the size it was mapped with
//! (pages past it fault with [`SimError::Bus`]); a swapped-out page shared with a forked
//! copy comes back through the swap cache, read-only while shared, so a write copies it.
//!
//! Left out on purpose (the kernel makes calls the simulation does not, or fewer; none
//! changes what a secondary must do to stay coherent):
//! - THP split notices: a layout change that cuts a 2 MiB block invalidates the whole
//!   block, even with transparent huge pages off for the process.
//! - Reclaim's reverse-map walk starts a one-page `Clear` in every mapping linked to the
//!   page's `anon_vma` whose offsets cover it (a forked child's mapping, or the process's
//!   own at the page's old offset after `mremap`), before looking for the page there.
//! - Fault-around: a read fault on a file mapping maps neighbouring cached pages too.
//! - `MADV_FREE` puts pages in a per-CPU batch that holds a reference for a while;
//!   reclaim skips them meanwhile.
//! - Placement: without a fixed address, Linux searches top-down from below the stack;
//!   the simulation hands out the lowest free range.
//!
//! ```
//! use std::sync::Arc;
//! use mmu_sim::{AddressSpace, FrameAllocator, Prot};
//!
//! let mm = AddressSpace::new(Arc::new(FrameAllocator::new(1024)));
//! let a = mm.mmap_anon(4 * 4096, Prot::READ_WRITE)?;
//! mm.write(a, 42)?;
//! assert_eq!(mm.read(a)?, 42);
//! mm.munmap(a, 4 * 4096)?; // one Unmap invalidation over the range
//! assert!(mm.read(a).is_err());
//! # Ok::<(), mmu_sim::SimError>(())
//! ```
#![deny(missing_docs)]

mod addr;
mod checker;
mod error;
mod file;
mod frame;
mod mm;
mod op;
mod pagetable;
mod vma;

pub use addr::{Len, VirtAddr};
pub use checker::{
    CheckedSecondary, Checker, SecondaryKind, Translation, Violation, ViolationKind,
};
pub use error::SimError;
pub use file::File;
pub use frame::{FrameAllocator, FrameRef, Pfn};
pub use mm::{
    AddressSpace, Advice, MapKind, MremapFlags, OomReap, PageState, ReclaimStats, SnapshotMode,
    MMAP_MIN_ADDR,
};
pub use op::SimOp;
pub use pagetable::{
    pte_index, Leaf, LeafGuard, PageOrder, PageTable, Pte, PteKind, PAGE_SIZE, TASK_SIZE,
};
pub use vma::{Backing, Prot, Vma, VmaMap};
