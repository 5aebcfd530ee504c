//! # mmu-uffd
//!
//! The real-process backend of the MMU notifier: watches this process's own memory with
//! userfaultfd's non-cooperative events and turns them into the same interval
//! invalidations the simulated primary fires, and a registration cache built on them.
//!
//! - [`Monitor`]: one userfaultfd and one thread. [`Monitor::watch`] registers memory
//!   (anonymous private or shared, memfd, and file mappings on kernels with `WP_ASYNC`) in
//!   write-protect mode with nothing protected, so no page fault is ever routed to the
//!   monitor; munmap, `MAP_FIXED` over, and mremap become `Unmap` invalidations of the old
//!   range, madvise `DONTNEED`/`FREE`/`REMOVE` a `Clear`, on
//!   [`Monitor::subscriptions`].
//! - [`RegCache`]: `get(ptr, len)` returns a [`CachedRegistration`] covering the range,
//!   created by a user [`Registrar`] on a miss; an invalidation of the range, including
//!   one still in flight, makes lookups miss; deregistration happens when the last handle
//!   drops, on a user thread; bounded, LRU.
//!
//! Where userfaultfd cannot be used (permissions, seccomp, kernel configuration)
//! [`Monitor::new`] fails with [`Error::Unavailable`] saying why.
//!
//! ```no_run
//! use mmu_uffd::{CacheConfig, Monitor, RegCache};
//!
//! let monitor = Monitor::new()?;
//! let cache = RegCache::with_fns(
//!     &monitor,
//!     CacheConfig::default().with_capacity(256),
//!     |ptr, len| Ok::<_, std::io::Error>((ptr as usize, len)), // e.g. ibv_reg_mr
//!     |_region| {},                                           // e.g. ibv_dereg_mr
//! );
//! let len = 1 << 20;
//! // SAFETY: an anonymous private mapping, unmapped below.
//! let p = unsafe {
//!     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
//! } as *const u8;
//! let first = cache.get(p, len)?;
//! assert!(first.is_valid());
//! // SAFETY: unmaps the mapping made above.
//! unsafe { libc::munmap(p as *mut _, len) };
//! assert!(!first.is_valid());              // the monitor applied the unmap before munmap's
//!                                          // caller could look again
//! # Ok::<(), mmu_uffd::Error>(())
//! ```

#![deny(missing_docs)]

mod applier;
mod cache;
mod coverage;
mod error;
mod fork;
mod gate;
#[cfg(feature = "io-uring")]
pub mod io_uring;
mod lru;
mod monitor;
mod queue;
mod ranges;
mod reader;
mod sync;
mod sys;

pub use cache::{CacheConfig, CacheStats, CachedRegistration, FnRegistrar, RegCache, Registrar};
pub use error::Error;
pub use monitor::{Capabilities, Monitor, MonitorConfig, MonitorStats};
