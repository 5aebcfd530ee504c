//! Reading: waits for events, reads them into a fixed buffer, and hands them to the
//! applying (see `queue`). Both of the monitor's threads read (see `applier` for when each
//! does what); this is the half of their work that must never wait for a user thread.
//!
//! # What reading may do
//!
//! Only system calls on the monitor's own descriptors and lock-free or futex-only
//! synchronization: `epoll_wait`, `read`, `close` of a forked child's descriptor, the
//! write-protect safety net for an unexpected fault, the gate's counter, the reading lock
//! and the queue's lock (both held only by the monitor's threads, for fixed work). It never
//! allocates (no formatting, no logging, no collections), never runs user code, and never
//! takes a lock a user thread may hold. Hence a thread it must release can never be
//! waiting for it: not an allocator trimming watched heap memory, not a fork holding the
//! allocator's locks, not an invalidation callback that unmaps.
//!
//! # Waking one thread per event
//!
//! Each thread waits in an epoll instance of its own, on the descriptor with
//! `EPOLLEXCLUSIVE` (and on the stop eventfd). The kernel then wakes only the first thread
//! that is actually asleep in `epoll_wait` for a new event: the thread that is busy
//! applying (maybe blocked in a callback) is skipped, and the other one reads. The
//! readiness is level-triggered, so a thread that was busy finds the descriptor readable
//! when it waits again and reads whatever is left (possibly nothing).
//!
//! # Why not a blocking `read()`
//!
//! A thread blocked in `read()` would save the `epoll_wait` (on one CPU, measured with the
//! cache bench's floor part: two threads in epoll and a non-blocking read are 1.18 times
//! the bare reader's blocking read, two threads both blocked in `read()` 1.12 times). But
//! the kernel's readers do not wait exclusively: every event wakes every thread blocked in
//! `read()`. And the gate needs one read in progress at a time: a batch is numbered
//! before its `read()`, and a thread blocked there holds a number it may complete long
//! after a later batch of the other thread was read and applied (a lookup would then pass
//! a gate that counts the first batch as applied while its events are not). Keeping one
//! blocked read at a time means the other thread waits for the reading lock, and the
//! reader has to wake it before it may run a callback: measured 1.26 times the bare
//! reader, slower than epoll. Mixing the two (one thread blocked in `read()`, the other in
//! epoll) is not possible either: the descriptor's poll answers an error unless it is
//! non-blocking, and a read blocks only if it is not (both read the file's flags). The
//! stop would also need an event made on purpose to wake a
//! thread blocked in `read()`, as neither closing the descriptor nor the eventfd does.
//!
//! # One batch
//!
//! Under the reading lock (one thread reads at a time: batch numbers must be published in
//! the order their `read()`s took the events): `gate.begin()` numbers the batch *before*
//! the `read()` that releases its unmappers; forked children's descriptors are closed at
//! once (a child's unmaps would otherwise wait on a context nobody reads); the
//! invalidations go to the queue with the batch number. A read that fails because no
//! descriptor slot is free for a child's context (EMFILE/ENFILE; the kernel leaves the
//! FORK event queued) publishes the empty batch, sleeps a millisecond and tries again: the
//! forking thread waits, nothing is lost, and the monitor recovers as soon as a slot frees
//! up.
//!
//! # Stop
//!
//! Reading goes on after `stopping` is set (the stop sequence releases the subscriptions,
//! whose callbacks may unmap) until `released`; then whatever is still queued is read,
//! without being applied, and the thread exits. The descriptor is closed when the last
//! clone of it is dropped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Release;
use std::time::Duration;

use mmu_notifier::Event;

use crate::monitor::{bump, Shared};
use crate::queue::Work;
use crate::sys::{self, Message, RawMsg, Uffd};

/// Messages read per `read()`, on the stack.
pub(crate) const BATCH: usize = 64;

/// One thread's epoll instance: the descriptor (exclusive wake-ups) and the stop eventfd.
#[derive(Debug)]
pub(crate) struct Waiter {
    epoll: OwnedFd,
}

/// The epoll tokens.
const EVENTS: u64 = 1;
const WOKEN: u64 = 2;

impl Waiter {
    /// Set up on the constructing thread (the thread itself must not allocate later).
    pub(crate) fn new(uffd: RawFd, wake: RawFd) -> std::io::Result<Waiter> {
        // SAFETY: plain system call with an integer argument.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor the kernel returned to us.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let add = |target: RawFd, events: u32, token: u64| {
            let mut ev = libc::epoll_event { events, u64: token };
            // SAFETY: `ev` is a live epoll_event for the call; both descriptors are open.
            let r =
                unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, target, &mut ev) };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        add(uffd, (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, EVENTS)?;
        add(wake, libc::EPOLLIN as u32, WOKEN)?;
        Ok(Waiter { epoll })
    }

    /// Waits (or only looks, if `block` is false) for events or the stop eventfd:
    /// `(events pending, woken)`.
    pub(crate) fn wait(&self, block: bool) -> std::io::Result<(bool, bool)> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
        loop {
            // SAFETY: `evs` is a live array of two epoll_event for the kernel to fill.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    evs.as_mut_ptr(),
                    2,
                    if block { -1 } else { 0 },
                )
            };
            if n >= 0 {
                let (mut events, mut woken) = (false, false);
                for ev in &evs[..n as usize] {
                    let token = ev.u64;
                    events |= token == EVENTS;
                    woken |= token == WOKEN;
                }
                return Ok((events, woken));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

/// Reads until the descriptor has nothing more, one batch per `read()`, under the
/// reading lock.
pub(crate) fn read_pending(
    shared: &Shared,
    uffd: &Uffd,
    buf: &mut [RawMsg; BATCH],
) -> std::io::Result<()> {
    // Held only by the monitor's threads, for reads and fixed work: never for long, never
    // across anything that waits for a user thread.
    let _reading = shared.reading.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let batch = shared.gate.begin();
        #[cfg(feature = "fault-injection")]
        let injected = match shared
            .inject_read_errno
            .swap(0, std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            errno => Some(std::io::Error::from_raw_os_error(errno)),
        };
        #[cfg(not(feature = "fault-injection"))]
        let injected = None;
        let n = match injected.map_or_else(|| uffd.read(buf), Err) {
            Ok(n) => n,
            Err(e) => {
                // Publish the empty batch either way, or lookups would wait for it.
                shared.queue.push(batch, std::iter::empty());
                shared.counted.store(batch, Release);
                return match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => {
                        bump(&shared.stats.read_backoffs);
                        std::thread::sleep(Duration::from_millis(1));
                        Ok(())
                    }
                    _ => Err(e),
                };
            }
        };
        let msgs = &buf[..n];
        // Children's descriptors and fault wake-ups first: they release threads that wait
        // for us, and must not depend on the applying.
        for m in msgs {
            match m.decode() {
                Message::Fork { fd } => {
                    bump(&shared.stats.forks);
                    sys::close_received(fd);
                }
                Message::Pagefault { address, .. } => {
                    bump(&shared.stats.unexpected_faults);
                    let page = address & !(shared.page - 1);
                    // The safety net: nothing is write-protected, so no fault is expected;
                    // if one comes, unprotect and wake the faulting thread.
                    let _ = uffd.unprotect(page, shared.page);
                }
                _ => {}
            }
        }
        let merged = shared.queue.push(
            batch,
            msgs.iter().flat_map(|m| work(shared, m.decode())).flatten(),
        );
        shared
            .stats
            .merged
            .fetch_add(merged, std::sync::atomic::Ordering::Relaxed);
        // Release: the counters bumped above are visible to whoever sees the batch counted.
        shared.counted.store(batch, Release);
        if n < BATCH {
            return Ok(());
        }
    }
}

/// What the applier must do for a message (and the message's counter).
fn work(shared: &Shared, msg: Message) -> [Option<Work>; 2] {
    let (start, end, event) = match msg {
        Message::Unmap { start, end } => {
            bump(&shared.stats.unmaps);
            (start, end, Event::Unmap)
        }
        Message::Remove { start, end } => {
            bump(&shared.stats.removes);
            (start, end, Event::Clear)
        }
        Message::Remap { from, to, len } => {
            bump(&shared.stats.remaps);
            // The moved mapping keeps its registration (REMAP is enabled): only the old
            // range is invalid.
            let old_end = from.saturating_add(len);
            return [
                Some(Work::Invalidate {
                    start: from,
                    end: old_end,
                    event: Event::Unmap,
                }),
                Some(Work::Moved { from, to, len }),
            ];
        }
        Message::Unknown(kind) => {
            bump(&shared.stats.unknown);
            return [Some(Work::Unknown(kind)), None];
        }
        Message::Fork { .. } | Message::Pagefault { .. } => return [None, None],
    };
    [Some(Work::Invalidate { start, end, event }), None]
}

/// At stop, after everything was unregistered: reads what is still queued so that every
/// blocked thread continues (closing children's descriptors), without applying it: every
/// subscription has been released already.
pub(crate) fn drain_unapplied(shared: &Shared, uffd: &Uffd) {
    let _reading = shared.reading.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = [RawMsg::ZERO; 16];
    while let Ok(n) = uffd.read(&mut buf) {
        if n == 0 {
            break;
        }
        for m in &buf[..n] {
            if let Message::Fork { fd } = m.decode() {
                sys::close_received(fd);
            }
        }
    }
}
