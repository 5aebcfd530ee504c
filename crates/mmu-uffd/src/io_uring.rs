//! io_uring fixed buffers as a [`Registrar`] (cargo feature `io-uring`).
//!
//! The rings are the `io-uring` crate's (version 0.7): depend on the same version to
//! build the operations and share the ring.
//!
//! [`FixedBuffers`] gives a ring a *sparse* fixed-buffer table of `slots` entries and
//! registers each range the cache asks for in a free slot of it. The registration, a
//! [`FixedBuffer`], is what `READ_FIXED` and `WRITE_FIXED` need: the slot's
//! [`index`](FixedBuffer::index) (`buf_index`), and the registered range, which the
//! operation's buffer must lie in ([`FixedBuffer::contains`]).
//!
//! ```no_run
//! use std::os::fd::AsRawFd;
//! use std::sync::{Arc, Mutex};
//! use io_uring::{opcode, types, IoUring};
//! use mmu_uffd::io_uring::{FixedBufferError, FixedBuffers};
//! use mmu_uffd::{CacheConfig, Monitor, RegCache};
//!
//! let monitor = Monitor::new()?;
//! let ring = Arc::new(Mutex::new(IoUring::new(64)?));
//! // 64 cache entries, and up to 16 handles held besides them at any time.
//! let buffers = match FixedBuffers::new(ring.clone(), 64 + 16) {
//!     Ok(b) => b,
//!     Err(FixedBufferError::Unavailable { .. }) => return Ok(()), // fall back to plain I/O
//!     Err(e) => return Err(e.into()),
//! };
//! let cache = RegCache::new(&monitor, CacheConfig::default().with_capacity(64), buffers);
//!
//! let file = std::fs::File::open("/etc/hostname")?;
//! let mut buf = vec![0u8; 1 << 16];
//! let fixed = cache.get(buf.as_ptr(), buf.len())?; // a miss registers, later gets hit
//! assert!(fixed.contains(buf.as_ptr(), buf.len()));
//! let read = opcode::ReadFixed::new(
//!     types::Fd(file.as_raw_fd()),
//!     buf.as_mut_ptr(),
//!     buf.len() as u32,
//!     fixed.index(),
//! )
//! .build();
//! let mut ring = ring.lock().unwrap();
//! // SAFETY: `buf` lives, and is not otherwise used, until the completion is reaped below;
//! // `fixed` is held (and the slot registered) until then too.
//! unsafe { ring.submission().push(&read)? };
//! ring.submit_and_wait(1)?;
//! let n = ring.completion().next().expect("one completion").result();
//! drop(ring); // before `fixed`: its release locks the ring (see "Locking")
//! drop(fixed);
//! # let _ = n;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The protocol
//!
//! - **A registration pins pages.** The kernel pins the pages mapped in the range when it
//!   is registered and keeps using *those pages* for every fixed operation on the slot,
//!   whatever later happens to the mapping: after an munmap (and a new mapping at the same
//!   address) the slot still accepts I/O there, which moves data to and from the old
//!   pages. That is why the registrations go through a [`RegCache`](crate::RegCache): it
//!   drops an entry whose memory was unmapped, moved or discarded, and registers the new
//!   memory on the next `get`.
//! - **A handle is a lease on the slot.** Submit fixed operations only while holding the
//!   [`CachedRegistration`](crate::CachedRegistration) they use, and keep holding it until
//!   their completions have been reaped. Check [`is_valid`](crate::CachedRegistration::is_valid)
//!   (or just `get` again) before new I/O: an invalid handle still pins the old pages.
//! - **Release.** The cache deregisters an entry when its last handle drops (the index's
//!   or the user's), on the thread that dropped it: the slot is emptied (its pages are
//!   unpinned once no operation in flight uses them) and goes back to the free list. The
//!   buffer index must not be used after the handle is dropped: the slot may by then hold
//!   another registration.
//! - **Slots.** The cache evicts before it registers, so its index never holds more than
//!   `capacity` registrations; every handle held after its entry left the index (evicted,
//!   invalidated, replaced by a merged range) keeps a slot too. Size the table as
//!   `slots >= capacity + the handles your program holds at once`; with fewer, a `get`
//!   can fail with [`FixedBufferError::TableFull`] (wrapped in
//!   [`Error::Register`](crate::Error::Register)).
//!
//! # Locking
//!
//! Registration and deregistration call `io_uring_register` through the ring's
//! [`Submitter`], which [`SharedRing`] reaches: by locking the ring's mutex for
//! `Mutex<IoUring>` (the default), without a lock for a bare `IoUring`. With a mutex, do
//! not call `get`, drop a handle or drop the cache while holding the ring's lock on the
//! same thread: the registrar would wait for that lock. Rings set up with
//! `IORING_SETUP_SINGLE_ISSUER` only accept registrations from their submitting thread, so
//! every `get` and every last handle must be on that thread.
//!
//! # Kernel requirements
//!
//! io_uring with sparse buffer tables (Linux 5.19). Where io_uring is disabled (the
//! `kernel.io_uring_disabled` sysctl, seccomp filters such as container runtimes'
//! defaults) or too old, [`FixedBuffers::new`] fails with
//! [`FixedBufferError::Unavailable`], which callers can match to fall back to unregistered
//! I/O. Pinned pages count against `RLIMIT_MEMLOCK` unless the process has
//! `CAP_IPC_LOCK`; one buffer is at most 1 GiB.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use ::io_uring::{cqueue, squeue, IoUring, Submitter};
use parking_lot::Mutex;

use crate::cache::Registrar;

/// The most slots a table may have: buffer indexes are 16 bits.
const MAX_SLOTS: u32 = 1 << 16;
/// The kernel's own limit on a buffer table (`IORING_MAX_REG_BUFFERS`): above it the
/// kernel answers `EINVAL`, which then means "too many", not "no sparse tables".
const KERNEL_MAX_SLOTS: u32 = 1 << 14;

/// How [`FixedBuffers`] reaches a ring's [`Submitter`] (for `io_uring_register`).
///
/// Implemented for a bare [`IoUring`] (no lock: registration only needs `&IoUring`, so the
/// ring can be shared as `Arc<IoUring>` with code that uses
/// [`IoUring::submission_shared`]) and for an [`IoUring`] in a `std` or `parking_lot`
/// mutex (locked for each registration and deregistration).
pub trait SharedRing: Send + Sync + 'static {
    /// Runs `f` with the ring's submitter.
    fn with_submitter<T>(&self, f: impl FnOnce(&Submitter<'_>) -> T) -> T;
}

impl<S, C> SharedRing for IoUring<S, C>
where
    S: squeue::EntryMarker + 'static,
    C: cqueue::EntryMarker + 'static,
{
    fn with_submitter<T>(&self, f: impl FnOnce(&Submitter<'_>) -> T) -> T {
        f(&self.submitter())
    }
}

impl<S, C> SharedRing for std::sync::Mutex<IoUring<S, C>>
where
    S: squeue::EntryMarker + 'static,
    C: cqueue::EntryMarker + 'static,
{
    fn with_submitter<T>(&self, f: impl FnOnce(&Submitter<'_>) -> T) -> T {
        // A panic while the ring was locked leaves the ring itself usable: registering
        // only needs its descriptor.
        let ring = self
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&ring.submitter())
    }
}

impl<S, C> SharedRing for parking_lot::Mutex<IoUring<S, C>>
where
    S: squeue::EntryMarker + 'static,
    C: cqueue::EntryMarker + 'static,
{
    fn with_submitter<T>(&self, f: impl FnOnce(&Submitter<'_>) -> T) -> T {
        f(&self.lock().submitter())
    }
}

/// Why a fixed-buffer table could not be set up or a range not registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixedBufferError {
    /// io_uring, or its sparse buffer tables, cannot be used by this process (disabled by
    /// sysctl or seccomp, not permitted, kernel too old). Match it to fall back to I/O
    /// without fixed buffers.
    #[error("io_uring fixed buffers are unavailable ({what}): {source}")]
    Unavailable {
        /// What was refused.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The table could not be set up for another reason: `slots` is 0 or above the
    /// kernel's limit, or the ring already has a buffer table (`EBUSY`).
    #[error("cannot set up a fixed-buffer table of {slots} slots: {source}")]
    Setup {
        /// The requested number of slots.
        slots: u32,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// Every slot holds a registration. With a cache, the table has fewer slots than the
    /// cache's capacity plus the handles held at once (see the module documentation).
    #[error("all {slots} fixed-buffer slots are in use (a table needs at least the cache's capacity plus the handles held at once)")]
    TableFull {
        /// Slots of the table.
        slots: u32,
    },
    /// The kernel refused to register the range: part of it is not mapped or not
    /// accessible (`EFAULT`), it is longer than 1 GiB (`EFAULT`), its memory cannot be
    /// pinned for long (some file mappings: `EOPNOTSUPP` or `EFAULT` depending on the
    /// kernel), or pinning it would exceed `RLIMIT_MEMLOCK` (`ENOMEM`). A null or empty range is refused here
    /// (`InvalidInput`).
    #[error("cannot register {addr:#x}+{len:#x} as a fixed buffer: {source}")]
    Register {
        /// Start of the range.
        addr: usize,
        /// Its length.
        len: usize,
        /// The reason.
        #[source]
        source: io::Error,
    },
}

/// One registered fixed buffer: a slot of a [`FixedBuffers`] table holding the pages of
/// `[addr, addr + len)`.
///
/// Use [`index`](Self::index) as the `buf_index` of `READ_FIXED`/`WRITE_FIXED` operations
/// whose buffer lies in the range, only while holding the handle that gave it (see the
/// module documentation).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct FixedBuffer {
    index: u16,
    addr: usize,
    len: usize,
    serial: u64,
}

impl FixedBuffer {
    /// The slot: the `buf_index` of fixed operations.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Start of the registered range.
    pub fn addr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Length of the registered range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: an empty range is not registered.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// A number telling this registration apart from every other of the same table,
    /// including earlier ones of the same slot (they count up from 1).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Whether `[ptr, ptr + len)` lies in the registered range (what the kernel checks of
    /// a fixed operation's buffer).
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = ptr as usize;
        start >= self.addr
            && start
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }
}

/// A ring's sparse fixed-buffer table as a [`Registrar`]: each registration takes a free
/// slot, each deregistration empties it and frees it. See the module documentation for the
/// protocol and an example.
///
/// Clones share the table (and its free list). The table is unregistered from the ring
/// when the last clone, and the last cache using one, is dropped.
pub struct FixedBuffers<R: SharedRing = std::sync::Mutex<IoUring>> {
    table: Arc<Table<R>>,
}

struct Table<R: SharedRing> {
    ring: Arc<R>,
    slots: u32,
    /// Free slots, popped from the back (the lowest first, then the most recently freed).
    free: Mutex<Vec<u16>>,
    /// The last serial handed out.
    serial: AtomicU64,
}

impl<R: SharedRing> Clone for FixedBuffers<R> {
    fn clone(&self) -> Self {
        FixedBuffers {
            table: self.table.clone(),
        }
    }
}

impl<R: SharedRing> fmt::Debug for FixedBuffers<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuffers")
            .field("slots", &self.table.slots)
            .field("free", &self.free_slots())
            .finish()
    }
}

impl FixedBuffers {
    /// A new ring of `entries` submission entries in a mutex, with a table of `slots`
    /// fixed buffers; the ring is [`ring`](Self::ring).
    pub fn with_new_ring(entries: u32, slots: u32) -> Result<Self, FixedBufferError> {
        let ring = IoUring::new(entries).map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::ENOMEM) => {
                FixedBufferError::Unavailable {
                    what: "io_uring_setup",
                    source,
                }
            }
            _ => FixedBufferError::Setup { slots, source },
        })?;
        FixedBuffers::new(Arc::new(std::sync::Mutex::new(ring)), slots)
    }
}

impl<R: SharedRing> FixedBuffers<R> {
    /// Registers a sparse table of `slots` fixed buffers (at most 16384, the kernel's
    /// limit) on `ring`, which must not have a buffer table yet. Slots are indexes
    /// `0..slots`.
    pub fn new(ring: Arc<R>, slots: u32) -> Result<Self, FixedBufferError> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(FixedBufferError::Setup {
                slots,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a table has 1 to 65536 slots (16-bit indexes)",
                ),
            });
        }
        ring.with_submitter(|s| s.register_buffers_sparse(slots))
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EOPNOTSUPP) => {
                    FixedBufferError::Unavailable {
                        what: "sparse fixed-buffer tables",
                        source,
                    }
                }
                // Kernels without sparse tables (before 5.19) refuse the flag.
                Some(libc::EINVAL) if slots <= KERNEL_MAX_SLOTS => FixedBufferError::Unavailable {
                    what: "sparse fixed-buffer tables",
                    source,
                },
                _ => FixedBufferError::Setup { slots, source },
            })?;
        let last = (slots - 1) as u16;
        Ok(FixedBuffers {
            table: Arc::new(Table {
                ring,
                slots,
                free: Mutex::new((0..=last).rev().collect()),
                serial: AtomicU64::new(0),
            }),
        })
    }

    /// The ring (to submit the fixed operations).
    pub fn ring(&self) -> &Arc<R> {
        &self.table.ring
    }

    /// Slots of the table.
    pub fn slots(&self) -> u32 {
        self.table.slots
    }

    /// Slots holding no registration now.
    pub fn free_slots(&self) -> usize {
        self.table.free.lock().len()
    }

    /// Points `index` at `iov` (the empty iovec empties it).
    fn update(&self, index: u16, iov: libc::iovec) -> io::Result<()> {
        self.table.ring.with_submitter(|s| {
            // SAFETY: the kernel checks the range (EFAULT unless it is mapped and
            // accessible) and pins the pages mapped there; from then on it uses those
            // pages and never goes through `iov_base` in this address space again, so
            // nothing of this process is accessed through the iovec after this call,
            // whatever happens to the mapping. I/O through the slot is submitted by the
            // caller (an unsafe push), whose contract is the protocol of this module: the
            // buffer index is only used while the registration is held. The empty iovec
            // only releases the slot.
            unsafe { s.register_buffers_update(index.into(), &[iov], None) }
        })
    }
}

impl<R: SharedRing> Registrar for FixedBuffers<R> {
    type Registration = FixedBuffer;
    type Error = FixedBufferError;

    fn register(&self, ptr: *mut u8, len: usize) -> Result<FixedBuffer, FixedBufferError> {
        let refuse = |source| FixedBufferError::Register {
            addr: ptr as usize,
            len,
            source,
        };
        if ptr.is_null() || len == 0 {
            // The kernel would take a null, empty iovec as "empty the slot".
            return Err(refuse(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a null or empty range",
            )));
        }
        let index = self
            .table
            .free
            .lock()
            .pop()
            .ok_or(FixedBufferError::TableFull {
                slots: self.table.slots,
            })?;
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        if let Err(source) = self.update(index, iov) {
            // A failed update leaves the slot empty.
            self.table.free.lock().push(index);
            return Err(refuse(source));
        }
        Ok(FixedBuffer {
            index,
            addr: ptr as usize,
            len,
            serial: self.table.serial.fetch_add(1, Relaxed) + 1,
        })
    }

    fn deregister(&self, buffer: FixedBuffer) {
        debug_assert!(u32::from(buffer.index) < self.table.slots);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        match self.update(buffer.index, empty) {
            Ok(()) => self.table.free.lock().push(buffer.index),
            // Keep the slot out of use rather than hand out one that may still hold pages.
            Err(e) => tracing::warn!(
                "cannot empty fixed-buffer slot {} ({:#x}+{:#x}); leaving it unused: {e}",
                buffer.index,
                buffer.addr,
                buffer.len
            ),
        }
    }
}

impl<R: SharedRing> Drop for Table<R> {
    fn drop(&mut self) {
        // No registration of this table is held any more (the caches and handles hold
        // clones): give the ring its table back.
        if let Err(e) = self.ring.with_submitter(|s| s.unregister_buffers()) {
            tracing::debug!("unregistering the fixed-buffer table: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// A table of `slots` on a new ring, or `None` with the reason printed.
    fn buffers_or_skip(test: &str, slots: u32) -> Option<FixedBuffers> {
        match FixedBuffers::with_new_ring(4, slots) {
            Ok(b) => Some(b),
            Err(e @ FixedBufferError::Unavailable { .. }) => {
                eprintln!("SKIPPED {test}: {e}");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// `pages` anonymous pages with protection `prot`.
    fn map(pages: usize, prot: i32) -> *mut u8 {
        // SAFETY: a new anonymous mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        p.cast()
    }

    fn unmap(p: *mut u8, pages: usize) {
        // SAFETY: unmaps a mapping made by `map` that nothing refers to any more.
        assert_eq!(unsafe { libc::munmap(p.cast(), pages * PAGE) }, 0);
    }

    #[test]
    fn a_freed_slot_is_reused() {
        let Some(buffers) = buffers_or_skip("a_freed_slot_is_reused", 4) else {
            return;
        };
        let p = map(4, libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!((buffers.slots(), buffers.free_slots()), (4, 4));
        let a = buffers.register(p, PAGE).unwrap();
        let b = buffers.register(p.wrapping_add(PAGE), 2 * PAGE).unwrap();
        assert_eq!((a.index(), b.index()), (0, 1), "the lowest slots first");
        assert_eq!((a.addr(), a.len()), (p, PAGE));
        assert!(b.contains(p.wrapping_add(PAGE + 10), PAGE));
        assert!(!b.contains(p.wrapping_add(PAGE + 10), 2 * PAGE));
        assert!(!b.contains(p, 1));
        assert!(a.serial() < b.serial());
        assert_eq!(buffers.free_slots(), 2);

        let (index, serial) = (a.index(), a.serial());
        buffers.deregister(a);
        assert_eq!(buffers.free_slots(), 3);
        let c = buffers.register(p.wrapping_add(3 * PAGE), PAGE).unwrap();
        assert_eq!(c.index(), index, "the freed slot is taken again");
        assert!(c.serial() > serial, "a new serial for the reused slot");

        buffers.deregister(b);
        buffers.deregister(c);
        assert_eq!(buffers.free_slots(), 4);
        unmap(p, 4);
    }

    #[test]
    fn a_full_table_is_an_error() {
        let Some(buffers) = buffers_or_skip("a_full_table_is_an_error", 2) else {
            return;
        };
        let p = map(1, libc::PROT_READ | libc::PROT_WRITE);
        let a = buffers.register(p, PAGE).unwrap();
        let b = buffers.register(p, PAGE).unwrap();
        let err = buffers.register(p, PAGE).unwrap_err();
        assert!(
            matches!(err, FixedBufferError::TableFull { slots: 2 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("capacity"), "{err}");
        buffers.deregister(b);
        let c = buffers.register(p, PAGE).unwrap();
        assert_eq!(c.index(), 1);
        buffers.deregister(a);
        buffers.deregister(c);
        assert_eq!(buffers.free_slots(), 2);
        unmap(p, 1);
    }

    #[test]
    fn unregistrable_ranges_are_errors() {
        let Some(buffers) = buffers_or_skip("unregistrable_ranges_are_errors", 2) else {
            return;
        };
        let refused = |ptr: *mut u8, len: usize| match buffers.register(ptr, len) {
            Err(FixedBufferError::Register {
                addr,
                len: l,
                source,
            }) => {
                assert_eq!((addr, l), (ptr as usize, len));
                source
            }
            other => panic!("{ptr:p}+{len:#x}: {other:?}"),
        };
        // Inaccessible memory cannot be pinned.
        let none = map(2, libc::PROT_NONE);
        let e = refused(none, 2 * PAGE);
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
        // Nor can a range that is not (all) mapped.
        let rw = map(2, libc::PROT_READ | libc::PROT_WRITE);
        unmap(rw.wrapping_add(PAGE), 1);
        let e = refused(rw, 2 * PAGE);
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
        // Null and empty ranges are refused before the kernel sees them.
        let e = refused(std::ptr::null_mut(), PAGE);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = refused(rw, 0);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // No slot was lost, and the table still works.
        assert_eq!(buffers.free_slots(), 2);
        let ok = buffers.register(rw, PAGE).unwrap();
        buffers.deregister(ok);
        assert_eq!(buffers.free_slots(), 2);
        unmap(none, 2);
        unmap(rw, 1);
    }

    #[test]
    fn bad_table_sizes_are_setup_errors() {
        for slots in [0, MAX_SLOTS + 1] {
            let ring = match IoUring::new(4) {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    eprintln!("SKIPPED bad_table_sizes_are_setup_errors: io_uring_setup: {e}");
                    return;
                }
            };
            let err = FixedBuffers::new(ring, slots).unwrap_err();
            assert!(
                matches!(err, FixedBufferError::Setup { slots: s, .. } if s == slots),
                "{err:?}"
            );
        }
    }

    #[test]
    fn dropping_the_last_clone_gives_the_ring_its_table_back() {
        let test = "dropping_the_last_clone_gives_the_ring_its_table_back";
        let Some(buffers) = buffers_or_skip(test, 2) else {
            return;
        };
        let ring = buffers.ring().clone();
        // A second table on the same ring is refused while the first exists.
        let err = FixedBuffers::new(ring.clone(), 2).unwrap_err();
        assert!(matches!(err, FixedBufferError::Setup { .. }), "{err:?}");
        let clone = buffers.clone();
        drop(buffers);
        assert_eq!(clone.free_slots(), 2, "clones share the table");
        drop(clone);
        let again = FixedBuffers::new(ring, 3).unwrap();
        assert_eq!(again.slots(), 3);
    }

    #[test]
    fn threads_share_the_free_list() {
        let Some(buffers) = buffers_or_skip("threads_share_the_free_list", 3) else {
            return;
        };
        let p = map(1, libc::PROT_READ | libc::PROT_WRITE);
        let addr = p as usize;
        std::thread::scope(|s| {
            for _ in 0..3 {
                let buffers = buffers.clone();
                s.spawn(move || {
                    for _ in 0..200 {
                        let b = buffers.register(addr as *mut u8, PAGE).unwrap();
                        assert!(b.index() < 3);
                        buffers.deregister(b);
                    }
                });
            }
        });
        assert_eq!(buffers.free_slots(), 3);
        unmap(p, 1);
    }
}
