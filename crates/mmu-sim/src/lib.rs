//! # mmu-sim
//!
//! A software primary MMU: an address space with VMAs, a four-level page table with
//! per-table locks, and a frame pool with reference counts and generations, whose
//! operations call the [`mmu_notifier`] subsystem exactly where Linux does (the event,
//! the range, the blockable flag, and the order against page-table changes and frees).
//!
//! This first part has anonymous private mappings, `munmap`, page faults and exit; the
//! other operations of SPEC 4 and the coherence checker come next.
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
