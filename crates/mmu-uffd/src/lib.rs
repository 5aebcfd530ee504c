//! # mmu-uffd
//!
//! The real-process backend of the MMU notifier: watches this process's own memory with
//! userfaultfd's non-cooperative events and turns them into the same interval
//! invalidations the simulated primary fires, and a registration cache built on them.
//!
//! - [`Monitor`]: one userfaultfd and two threads (each reads without allocating, and
//!   runs the callbacks when the other is not). [`Monitor::watch`] registers memory
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
//! # How it works
//!
//! Each mechanism's protocol is written down on its module's page: [`monitor`] (the
//! descriptor, what is watched, the stop sequence), [`reader`] and [`applier`] (the two
//! threads, and why reading never allocates), [`queue`] (the hand-over between them),
//! [`gate`] (why "munmap has returned" implies "the invalidation has been applied", and the
//! address-reuse check), [`cache`] (the fill protocol of the registration cache and its
//! limits), [`fork`] (what a child process inherits).
//!
//! # What "never stale" covers
//!
//! A lookup that starts after an munmap, mremap or madvise of the memory has returned never
//! gets a registration made before that call, on this thread or any other; neither does a
//! lookup of memory mapped at an address that another thread's munmap freed, even while
//! that munmap has not returned yet (the default [`CacheConfig::reuse_check`]: one system
//! call per hit). [`Monitor::sync`] gives raw subscribers the same guarantee.
//!
//! # Which memory is safe to watch
//!
//! - Anonymous memory, private or shared, memfd, and file mappings on kernels with
//!   `WP_ASYNC` (Linux 6.7; see [`Monitor::capabilities`]).
//! - Heap memory from the allocator: the monitor's reader never allocates, so an allocator
//!   that trims watched memory, or a fork that holds the allocator's locks, cannot hang
//!   it. An allocator keeps most freed blocks mapped, so the registration of a freed heap
//!   buffer stays valid (it names the same pages) until the allocator really unmaps or
//!   trims them.
//! - Changes the kernel does not report: SysV shared memory (`shmdt`), mprotect,
//!   `MADV_GUARD_INSTALL`, `fallocate(PUNCH_HOLE)` on mapped memfd or file pages, and
//!   unmaps by the kernel itself. Call [`RegCache::invalidate`] after such a change.
//! - Watching part of a mapping splits it in the kernel, and `mremap` refuses a range that
//!   spans two mappings: look up (or [`Monitor::watch`]) whole buffers that the program
//!   resizes or moves with `mremap`.
//! - Memory is watched only while something needs it: [`Monitor::watch`] until
//!   [`Monitor::unwatch`], a cache entry while it exists.
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

// userfaultfd, its non-cooperative events and `/proc/self/maps` are Linux's: this crate is
// Linux-only (the core crate, mmu-notifier, builds on any `std` target).
// `--cfg mmu_uffd_pretend_not_linux` triggers the message on Linux, to test it.
#[cfg(any(not(target_os = "linux"), mmu_uffd_pretend_not_linux))]
compile_error!(
    "mmu-uffd supports Linux only: it watches memory with Linux's userfaultfd. \
     The core crate, mmu-notifier, builds on every std target."
);

pub mod applier;
pub mod cache;
mod coverage;
mod error;
pub mod fork;
pub mod gate;
#[cfg(feature = "io-uring")]
pub mod io_uring;
mod lru;
pub mod monitor;
pub mod queue;
mod ranges;
pub mod reader;
mod sync;
mod sys;

pub use cache::{
    CacheConfig, CacheKey, CacheStats, CachedRegistration, FnRegistrar, KeyedFnRegistrar,
    KeyedRegistrar, RegCache, Registrar,
};
pub use error::Error;
pub use monitor::{Capabilities, Monitor, MonitorConfig, MonitorState, MonitorStats};
