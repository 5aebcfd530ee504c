//! The userfaultfd system interface: the few ioctls and the message format, written against
//! `libc` directly.
//!
//! Why not the `userfaultfd` crate: it generates its bindings with bindgen, which needs
//! libclang at build time (not on a clean CI machine), and what it wraps is small: three
//! ioctls and one 32-byte message. We also need what it does not expose conveniently:
//! `UFFD_USER_MODE_ONLY`, the `/dev/userfaultfd` fallback, write-protect-only
//! registration with `WP_ASYNC`, batched non-blocking reads and the fork descriptor.
//!
//! Everything here is a thin, checked wrapper; policy lives in `monitor.rs`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::Error;

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, 24);
/// `_IOWR(UFFDIO, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, 32);
/// `_IOR(UFFDIO, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
/// `_IO(UFFDIO, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

/// `UFFD_USER_MODE_ONLY`: only faults from user mode would be handled. We handle no fault
/// at all, and this flag is what an unprivileged process may use when
/// `vm.unprivileged_userfaultfd` is 0.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

const REGISTER_MODE_WP: u64 = 1 << 1;

/// Kernel feature bits (`UFFD_FEATURE_*`) this crate uses.
pub(crate) mod feature {
    /// Write-protect mode exists (needed for WP registration).
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// FORK events: the child's context arrives as a new descriptor.
    pub const EVENT_FORK: u64 = 1 << 1;
    /// REMAP events (mremap moves).
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// REMOVE events (madvise DONTNEED / FREE / REMOVE).
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// UNMAP events (munmap, MAP_FIXED over, mremap shrink).
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// Write-protect registration of shmem and hugetlbfs (memfd, MAP_SHARED anonymous).
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// Write-protect faults resolved by the kernel; with it a WP-only registration is
    /// allowed on any memory type (regular file mappings included).
    pub const WP_ASYNC: u64 = 1 << 15;

    /// Names for error messages.
    pub fn name(bit: u64) -> &'static str {
        match bit {
            PAGEFAULT_FLAG_WP => "PAGEFAULT_FLAG_WP (write-protect mode, Linux 5.7)",
            EVENT_FORK => "EVENT_FORK",
            EVENT_REMAP => "EVENT_REMAP",
            EVENT_REMOVE => "EVENT_REMOVE",
            EVENT_UNMAP => "EVENT_UNMAP",
            WP_HUGETLBFS_SHMEM => "WP_HUGETLBFS_SHMEM (Linux 5.19)",
            WP_ASYNC => "WP_ASYNC (Linux 6.7)",
            _ => "unknown feature",
        }
    }
}

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// One `struct uffd_msg`: 32 bytes, packed; the event byte, 7 reserved, a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RawMsg([u8; 32]);

impl RawMsg {
    pub(crate) const ZERO: RawMsg = RawMsg([0; 32]);

    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_ne_bytes(b)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }

    /// Decodes the message (the union starts at byte 8).
    pub(crate) fn decode(&self) -> Message {
        match self.0[0] {
            EVENT_UNMAP => Message::Unmap {
                start: self.u64_at(8),
                end: self.u64_at(16),
            },
            EVENT_REMOVE => Message::Remove {
                start: self.u64_at(8),
                end: self.u64_at(16),
            },
            EVENT_REMAP => Message::Remap {
                from: self.u64_at(8),
                to: self.u64_at(16),
                len: self.u64_at(24),
            },
            EVENT_FORK => Message::Fork {
                fd: self.u32_at(8) as RawFd,
            },
            EVENT_PAGEFAULT => Message::Pagefault {
                flags: self.u64_at(8),
                address: self.u64_at(16),
            },
            other => Message::Unknown(other),
        }
    }
}

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// `[start, end)` was unmapped (already gone when read).
    Unmap { start: u64, end: u64 },
    /// `[start, end)` is about to be zapped by madvise (read before the zap).
    Remove { start: u64, end: u64 },
    /// `[from, from + len)` moved to `to` (already moved when read).
    Remap { from: u64, to: u64, len: u64 },
    /// A child's context, as a descriptor now open in this process.
    Fork { fd: RawFd },
    /// A page fault: never expected (nothing is write-protected).
    Pagefault { flags: u64, address: u64 },
    /// An event this code does not know.
    Unknown(u8),
}

/// An open, handshaken userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOTTY) => "ENOTTY".into(),
        Some(n) => format!("errno {n}"),
        None => "error".into(),
    }
}

/// Opens a raw userfaultfd (close-on-exec, non-blocking): the `userfaultfd(2)` system call
/// in user-mode-only form first, then `/dev/userfaultfd`. On failure, says what each
/// attempt answered and what usually causes it.
fn open_raw() -> Result<OwnedFd, Error> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let mut why = Vec::new();
    // SAFETY: a plain system call with integer arguments; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let e = io::Error::last_os_error();
    why.push(format!(
        "userfaultfd(2) failed with {} ({e})",
        errno_name(&e)
    ));
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new
            // descriptor; `dev` is open for the duration of the call.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if fd >= 0 {
                // SAFETY: a new descriptor the kernel returned to us.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            why.push(format!(
                "/dev/userfaultfd USERFAULTFD_IOC_NEW failed with {} ({e})",
                errno_name(&e)
            ));
        }
        Err(e) => why.push(format!(
            "opening /dev/userfaultfd failed with {} ({e})",
            errno_name(&e)
        )),
    }
    Err(Error::Unavailable {
        reason: format!(
            "{}. Usual causes: a seccomp profile blocks the system call (container \
             runtimes' default profiles do), the kernel lacks CONFIG_USERFAULTFD, or the \
             process may neither use the system call (vm.unprivileged_userfaultfd=0 without \
             CAP_SYS_PTRACE) nor open /dev/userfaultfd (root-only by default)",
            why.join("; ")
        ),
    })
}

impl Uffd {
    /// The features this kernel offers (a throwaway descriptor: the handshake can only be
    /// done once per descriptor).
    pub(crate) fn probe_features() -> Result<u64, Error> {
        let fd = open_raw()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is
        // (repr(C), three u64), alive for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r < 0 {
            return Err(Error::Unavailable {
                reason: format!(
                    "the UFFDIO_API handshake failed: {}",
                    io::Error::last_os_error()
                ),
            });
        }
        Ok(api.features)
    }

    /// Opens a descriptor with exactly `features` enabled.
    pub(crate) fn open(features: u64) -> Result<Uffd, Error> {
        let fd = open_raw()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: as in `probe_features`.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(Error::Unavailable {
                reason: format!("the UFFDIO_API handshake with features {features:#x} failed: {e}"),
            });
        }
        Ok(Uffd { fd })
    }

    /// Registers `[start, start + len)` in write-protect mode. Nothing is write-protected,
    /// so no fault is ever routed to us; the VMAs now deliver the enabled events.
    pub(crate) fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register` (repr(C),
        // four u64), alive for the call. It changes VMA flags only, never memory contents.
        retry_eintr(|| unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })
    }

    /// Unregisters `[start, start + len)`.
    pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, alive for the call.
        retry_eintr(|| unsafe {
            libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range)
        })
    }

    /// Reads as many pending messages as fit in `buf`, without blocking: `Ok(0)` when none
    /// is pending. Reading is what releases the threads blocked on those events.
    pub(crate) fn read(&self, buf: &mut [RawMsg]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `size_of_val(buf)` bytes; RawMsg is a
            // plain byte array, so any bytes the kernel writes are a valid value.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(buf),
                )
            };
            if n >= 0 {
                return Ok(n as usize / std::mem::size_of::<RawMsg>());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn retry_eintr(mut f: impl FnMut() -> libc::c_int) -> io::Result<()> {
    loop {
        if f() >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// An eventfd used to wake the monitor thread for shutdown.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain system call with integer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor the kernel returned to us.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) already means
        // "signalled", so the result does not matter.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (non-blocking; nothing to do if it is zero).
    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (already zero) is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Closes a descriptor the kernel handed us in a message (a forked child's context).
pub(crate) fn close_received(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: the kernel installed this descriptor in our table for us alone (the FORK
        // message); nothing else knows its number, so taking ownership is sound.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Blocks every signal on the calling thread, so handlers never run on the monitor thread
/// (process-directed signals go to other threads; EINTR cannot happen for blocked signals,
/// and is retried anyway).
pub(crate) fn block_all_signals() {
    // SAFETY: `set` is initialised by sigfillset before use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The kernel's `struct sched_attr` in its first version (48 bytes), which every kernel
/// with `sched_setattr` accepts.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// The shortest time slice Linux's scheduler grants a normal thread on request: 0.1 ms.
const SHORT_SLICE_NS: u64 = 100_000;

/// Asks the scheduler to run the calling thread in short slices (Linux 6.12 and later:
/// `sched_setattr` with a `sched_runtime` for a normal thread), keeping its policy and nice
/// value. With a short slice the thread's virtual deadline is early, so a thread it wakes
/// on its own CPU (an unmapper released by the read of its event) waits until this one
/// sleeps again instead of preempting it. Older kernels ignore the runtime of a normal
/// thread; a thread with another policy (batch, idle, real-time) is left alone. Returns
/// whether the request was made and accepted.
pub(crate) fn request_short_slice() -> bool {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a live local.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0 as libc::c_uint,
        )
    };
    if r != 0 || attr.policy != libc::SCHED_OTHER as u32 {
        return false;
    }
    attr.size = size;
    attr.flags = 0;
    attr.runtime = SHORT_SLICE_NS;
    // SAFETY: sched_setattr reads `size` bytes of `attr`, a live local.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    r == 0
}

/// The system page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory arguments.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// `_IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, 24);

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

impl Uffd {
    /// Removes write protection from `[start, start + len)` and wakes any thread waiting on
    /// it. A safety net: nothing is ever write-protected, so no thread should wait.
    pub(crate) fn unprotect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: 0,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `struct uffdio_writeprotect`
        // (repr(C), three u64), alive for the call; mode 0 only removes protection.
        retry_eintr(|| unsafe {
            libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp)
        })
    }
}

/// Whether every page of `[start, start + len)` is mapped: `msync(MS_ASYNC)` does nothing
/// but walk the mappings, and fails with ENOMEM where there is a hole.
pub(crate) fn check_mapped(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: MS_ASYNC neither reads nor writes the memory; the kernel only validates the
    // range against the process's mappings.
    retry_eintr(|| unsafe { libc::msync(start as *mut libc::c_void, len as usize, libc::MS_ASYNC) })
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOMEM) => io::Error::new(
                io::ErrorKind::NotFound,
                "part of the range is not mapped (ENOMEM)",
            ),
            _ => e,
        })
}

/// What the kernel says about events in flight on this descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InFlight {
    /// An unmap, move, madvise or fork that reports to this descriptor has started and its
    /// thread has not yet resumed after the monitor read its event.
    Changing,
    /// Nothing in flight at the moment of the call.
    Quiet,
}

impl Uffd {
    /// Asks the kernel whether any event of this descriptor is in flight.
    ///
    /// The kernel keeps a per-descriptor count, `mmap_changing`, raised by an unmapping,
    /// moving, madvise or forking thread *before* it changes the address space and lowered
    /// by that same thread once the monitor has read its event and it has resumed.
    /// `UFFDIO_WRITEPROTECT` tests that count before anything else and answers `EAGAIN`
    /// while it is raised; otherwise it validates the range, and an empty range answers
    /// `EINVAL`. So a write-protect of nothing is a pure probe: it can change no page.
    pub(crate) fn in_flight(&self) -> io::Result<InFlight> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start: 0, len: 0 },
            mode: 0,
        };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`, alive for
            // the call; an empty range is refused before any page is looked at.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
            if r >= 0 {
                // No kernel accepts an empty range; treat it as "nothing in flight" rather
                // than guessing.
                return Ok(InFlight::Quiet);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(InFlight::Changing),
                Some(libc::EINVAL) => return Ok(InFlight::Quiet),
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// The process's mappings as `[start, end)` ranges, from `/proc/self/maps` (empty if it
/// cannot be read). Allocates: not for the reader thread.
pub(crate) fn mappings() -> Vec<(u64, u64)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(|line| {
            let range = line.split_whitespace().next()?;
            let (s, e) = range.split_once('-')?;
            let (s, e) = (
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            );
            (s < e).then_some((s, e))
        })
        .collect()
}
