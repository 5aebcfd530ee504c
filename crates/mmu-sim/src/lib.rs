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

mod checker;
mod error;
mod file;
mod frame;
mod mm;
mod pagetable;
mod vma;

pub use checker::{CheckedSecondary, Checker, SecondaryKind, Violation, ViolationKind};
pub use error::SimError;
pub use file::File;
pub use frame::{FrameAllocator, FrameRef, Pfn};
pub use mm::{
    AddressSpace, Advice, MapKind, MremapFlags, OomReap, PageState, ReclaimStats, SnapshotMode,
    MMAP_MIN_ADDR,
};
pub use pagetable::{pte_index, Leaf, LeafGuard, PageTable, Pte, PteKind, PAGE_SIZE, TASK_SIZE};
pub use vma::{Backing, Prot, Vma, VmaMap};
