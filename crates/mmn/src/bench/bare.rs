//! A bare userfaultfd reader, the baseline of the cache's munmap latency, the timestamping
//! subscriber of the monitored side, CPU pinning and fresh anonymous mappings; shared by
//! `mmn bench` and the benches `crates/mmu-uffd/benches/cache.rs` and
//! `crates/mmu-uffd-capi/benches/miss_vs_libfabric.rs` (which include this file). Depends
//! on `libc` and `mmu_notifier` only.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mmu_notifier::{IntervalContext, IntervalSubscriber, Range, WouldBlock};

/// An interval subscriber that records when its invalidation ran (ns since the epoch).
pub struct Stamp(pub Arc<AtomicU64>, pub Instant);

impl IntervalSubscriber for Stamp {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        // Release: pairs with the unmapping thread's Acquire load of the stamp.
        self.0
            .store(self.1.elapsed().as_nanos() as u64, Ordering::Release);
        Ok(())
    }
}

/// A bare reader: a userfaultfd opened and registered like the monitor's (user-mode
/// faults only, write-protect mode, unmap events), and a thread blocked in `read()` that
/// timestamps every event.
pub struct Bare {
    fd: RawFd,
    /// When the last event was read, in ns since the epoch (0: none since reset).
    pub seen: Arc<AtomicU64>,
}

impl Bare {
    /// Opens the userfaultfd and starts the reader thread.
    pub fn new(epoch: Instant) -> Result<Bare, String> {
        // _IOWR(0xAA, 0x3F, struct uffdio_api): 24 bytes.
        const API: u64 = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | 1) } as RawFd;
        if fd < 0 {
            return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
        }
        // api, features: PAGEFAULT_FLAG_WP | EVENT_UNMAP, ioctls (out).
        let mut api = [0xAAu64, 1 | (1 << 6), 0];
        // SAFETY: UFFDIO_API reads and writes three u64 in a live array.
        if unsafe { libc::ioctl(fd, API as _, api.as_mut_ptr()) } < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closes the descriptor opened above, used by nothing else.
            unsafe { libc::close(fd) };
            return Err(format!("UFFDIO_API: {e}"));
        }
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        // The reader lives as long as the process (the descriptor stays open: closing it
        // under a blocked read is not a way to wake it).
        std::thread::spawn(move || loop {
            let mut msg = [0u8; 32];
            // SAFETY: reads one 32-byte message into a live buffer.
            let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
            if n == 32 {
                // Release: pairs with the unmapping thread's Acquire load.
                s2.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
            } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        });
        Ok(Bare { fd, seen })
    }

    /// UFFDIO_REGISTER of `[p, p + len)` in write-protect mode.
    pub fn watch(&self, p: *mut u8, len: usize) {
        // _IOWR(0xAA, 0x00, struct uffdio_register): 32 bytes.
        const REGISTER: u64 = (3 << 30) | (32 << 16) | (0xAA << 8);
        let mut reg = [p as u64, len as u64, 2, 0];
        // SAFETY: UFFDIO_REGISTER reads and writes four u64 in a live array.
        let r = unsafe { libc::ioctl(self.fd, REGISTER as _, reg.as_mut_ptr()) };
        assert_eq!(r, 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
    }

    /// An ioctl the userfaultfd does not know (it answers EINVAL at once): the floor of
    /// any ioctl on this descriptor (file lookup, security hook, dispatch), against which
    /// the cache's in-flight probe (an empty `UFFDIO_WRITEPROTECT`) can be measured.
    pub fn unknown_ioctl(&self) -> i32 {
        // _IO(0xAA, 0x7F): no userfaultfd command has that number.
        const UNKNOWN: u64 = (0xAA << 8) | 0x7F;
        // SAFETY: an unknown command reads and writes nothing; the argument is unused.
        unsafe { libc::ioctl(self.fd, UNKNOWN as _, 0usize) }
    }
}

/// A fresh private anonymous read-write mapping of `len` bytes.
pub fn anon(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Pins the calling thread to `cpu` (threads it creates afterwards inherit the mask).
pub fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
    // sched_setaffinity(0, ...) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
