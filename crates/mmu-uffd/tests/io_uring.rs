//! io_uring fixed buffers against memory replaced at the same address (see the example
//! `io_uring_stale`): a registration kept across the replacement moves data to and from
//! the old, pinned pages; the cache invalidates it and registers the new memory instead.

mod common;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use io_uring::{opcode, squeue, types, IoUring};
use mmu_uffd::{CacheConfig, RegCache, Registrar};

const SLOTS: u32 = 8;
const FILL: u8 = 0xab;
const OLD: u8 = 0x5a;
const LEN: usize = 2 * PAGE;

/// Where the tests put their buffers (one MiB apart, one area per test). The tests unmap a
/// buffer and map it again at the same address; between the two, any other thread's mmap
/// could take the hole if the buffer were where the kernel puts new mappings (the test
/// harness starting the next test's thread maps its stack and signal stack, and did take
/// it). The kernel allocates top-down from just below the libraries, so an area far below
/// them is left alone.
const AREA: usize = 0x1000_0000_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FixedBuf {
    slot: u16,
    serial: u64,
}

struct Ring {
    uring: Mutex<IoUring>,
}

impl Ring {
    /// A ring with a sparse fixed-buffer table, or `None` with the reason printed.
    fn or_skip(test: &str) -> Option<Arc<Ring>> {
        let made = IoUring::new(8).and_then(|uring| {
            uring.submitter().register_buffers_sparse(SLOTS)?;
            Ok(uring)
        });
        match made {
            Ok(uring) => Some(Arc::new(Ring {
                uring: Mutex::new(uring),
            })),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EINVAL)
                ) =>
            {
                eprintln!(
                    "SKIPPED {test}: io_uring with a sparse fixed-buffer table is unavailable: {e}"
                );
                None
            }
            Err(e) => panic!("{test}: io_uring setup: {e}"),
        }
    }

    fn update_slot(&self, slot: u16, iov: libc::iovec) -> io::Result<()> {
        let uring = self.uring.lock().unwrap();
        // SAFETY: the kernel validates the iovec and pins its pages (the empty iovec
        // releases the slot); it never goes through `iov_base` again, so replacing the
        // mapping later (what these tests do) touches nothing of this process.
        unsafe {
            uring
                .submitter()
                .register_buffers_update(slot.into(), &[iov], None)
        }
    }

    fn run(&self, sqe: squeue::Entry) -> io::Result<usize> {
        let mut uring = self.uring.lock().unwrap();
        // SAFETY: the buffer of every operation built below is a live mapping of at least
        // the requested length, and the completion is awaited before returning, with the
        // ring held, so no operation outlives this call.
        unsafe { uring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        loop {
            match uring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            if let Some(cqe) = uring.completion().next() {
                return match cqe.result() {
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    r => Ok(r as usize),
                };
            }
        }
    }

    fn read_fixed(&self, file: &File, buf: *mut u8, len: usize, slot: u16) -> usize {
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::ReadFixed::new(fd, buf, len as u32, slot).build())
            .expect("READ_FIXED")
    }

    fn write_fixed(&self, file: &File, buf: *const u8, len: usize, slot: u16) -> usize {
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::WriteFixed::new(fd, buf, len as u32, slot).build())
            .expect("WRITE_FIXED")
    }
}

#[derive(Default)]
struct Counters {
    registered: AtomicUsize,
    deregistered: AtomicUsize,
    /// Threads the deregistrations ran on.
    threads: Mutex<Vec<Option<String>>>,
}

#[derive(Clone)]
struct FixedBuffers {
    ring: Arc<Ring>,
    free: Arc<Mutex<Vec<u16>>>,
    serial: Arc<AtomicU64>,
    counts: Arc<Counters>,
}

impl FixedBuffers {
    fn new(ring: Arc<Ring>) -> Self {
        FixedBuffers {
            ring,
            free: Arc::new(Mutex::new((0..SLOTS as u16).rev().collect())),
            serial: Arc::new(AtomicU64::new(1)),
            counts: Arc::default(),
        }
    }

    fn free_slots(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

impl Registrar for FixedBuffers {
    type Registration = FixedBuf;
    type Error = io::Error;

    fn register(&self, ptr: *mut u8, len: usize) -> io::Result<FixedBuf> {
        let slot = self
            .free
            .lock()
            .unwrap()
            .pop()
            .ok_or_else(|| io::Error::other("no free fixed-buffer slot"))?;
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        if let Err(e) = self.ring.update_slot(slot, iov) {
            self.free.lock().unwrap().push(slot);
            return Err(e);
        }
        self.counts.registered.fetch_add(1, Ordering::SeqCst);
        Ok(FixedBuf {
            slot,
            serial: self.serial.fetch_add(1, Ordering::SeqCst),
        })
    }

    fn deregister(&self, buf: FixedBuf) {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        self.ring
            .update_slot(buf.slot, empty)
            .expect("emptying a fixed-buffer slot");
        self.free.lock().unwrap().push(buf.slot);
        self.counts.deregistered.fetch_add(1, Ordering::SeqCst);
        self.counts
            .threads
            .lock()
            .unwrap()
            .push(std::thread::current().name().map(str::to_string));
    }
}

/// A fresh mapping of `LEN` bytes filled with `OLD`, in test `n`'s area if it is free (else
/// anywhere).
fn buffer(n: usize) -> *mut u8 {
    let at = AREA + (n << 20);
    // SAFETY: a new anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing one.
    let p = unsafe {
        libc::mmap(
            at as *mut _,
            LEN,
            RW,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    let p = if p == at as *mut _ {
        p.cast()
    } else {
        if p != libc::MAP_FAILED {
            // A kernel that took MAP_FIXED_NOREPLACE as a hint (before 4.17).
            unmap(p.cast(), LEN);
        }
        map(0, LEN, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    // SAFETY: `p` is a fresh mapping of LEN writable bytes.
    unsafe { std::ptr::write_bytes(p, OLD, LEN) };
    p
}

/// munmap, then new anonymous memory at the same address.
fn replace_mapping(p: *mut u8) {
    unmap(p, LEN);
    let q = map(
        p as usize,
        LEN,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
        -1,
        0,
    );
    assert_eq!(q, p, "new memory must be mapped at the same address");
}

fn bytes_at(p: *const u8) -> Vec<u8> {
    // SAFETY: `p` is a live, readable mapping of LEN bytes and no I/O is writing to it.
    unsafe { std::slice::from_raw_parts(p, LEN) }.to_vec()
}

fn temp_file(contents: &[u8]) -> File {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "mmu-uffd-io_uring-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("temporary file");
    std::fs::remove_file(&path).unwrap();
    file.write_all_at(contents, 0).unwrap();
    file
}

fn file_bytes(file: &File) -> Vec<u8> {
    let mut v = vec![0u8; LEN];
    file.read_exact_at(&mut v, 0).unwrap();
    v
}

fn all(bytes: &[u8], b: u8) -> bool {
    bytes.iter().all(|&x| x == b)
}

/// Without invalidation: the registration kept across munmap + mmap at the same address
/// still accepts I/O there, but the I/O goes to the old pages.
#[test]
fn kept_registration_does_io_on_the_old_pages() {
    let test = "kept_registration_does_io_on_the_old_pages";
    let Some(ring) = Ring::or_skip(test) else {
        return;
    };
    let buffers = FixedBuffers::new(ring.clone());
    let source = temp_file(&[FILL; LEN]);
    let sink = temp_file(&[]);

    let p = buffer(0);
    let stale = buffers.register(p, LEN).unwrap();
    // Sanity: through a live registration, the read lands in the buffer.
    assert_eq!(ring.read_fixed(&source, p, LEN, stale.slot), LEN);
    assert!(all(&bytes_at(p), FILL));
    // SAFETY: `p` is a live mapping of LEN writable bytes, no I/O in flight.
    unsafe { std::ptr::write_bytes(p, OLD, LEN) };

    replace_mapping(p);
    assert!(all(&bytes_at(p), 0), "new anonymous memory reads zero");
    assert_eq!(
        ring.read_fixed(&source, p, LEN, stale.slot),
        LEN,
        "the read through the stale slot completes in full"
    );
    let now = bytes_at(p);
    assert!(
        all(&now, 0),
        "the new memory did not receive the read: {:02x?}",
        &now[..8]
    );
    assert_eq!(ring.write_fixed(&sink, p, LEN, stale.slot), LEN);
    let sunk = file_bytes(&sink);
    assert!(
        all(&sunk, FILL),
        "the read went to the old, pinned pages: {:02x?}",
        &sunk[..8]
    );
    assert!(all(&bytes_at(p), 0));

    buffers.deregister(stale);
    assert_eq!(buffers.free_slots(), SLOTS as usize);
    unmap(p, LEN);
}

/// A second `get` of the same live buffer is a hit: same registration, no new register.
#[test]
fn cache_hit_reuses_the_fixed_buffer() {
    let test = "cache_hit_reuses_the_fixed_buffer";
    let Some(monitor) = monitor_or_skip(test) else {
        return;
    };
    let Some(ring) = Ring::or_skip(test) else {
        return;
    };
    let buffers = FixedBuffers::new(ring.clone());
    let cache = RegCache::new(&monitor, CacheConfig::default(), buffers.clone());
    let source = temp_file(&[FILL; LEN]);

    let p = buffer(1);
    let a = cache.get(p, LEN).unwrap();
    let b = cache.get(p, LEN).unwrap();
    let c = cache.get(p.wrapping_add(100), 10).unwrap();
    assert_eq!(*a, *b);
    assert_eq!(*a, *c);
    assert_eq!(a.start(), p);
    assert_eq!(a.len(), LEN);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.registered), (2, 1, 1), "{s:?}");
    assert_eq!(buffers.counts.registered.load(Ordering::SeqCst), 1);

    assert_eq!(ring.read_fixed(&source, p, LEN, b.slot), LEN);
    assert!(all(&bytes_at(p), FILL));

    drop((a, b, c));
    assert_eq!(
        buffers.counts.deregistered.load(Ordering::SeqCst),
        0,
        "the index still holds the entry"
    );
    drop(cache);
    assert_eq!(buffers.counts.deregistered.load(Ordering::SeqCst), 1);
    unmap(p, LEN);
}

/// With the cache: munmap + mmap at the same address invalidates the entry, the next
/// `get` registers the new memory in another slot, and the read lands in the new memory.
#[test]
fn cache_reregisters_replaced_memory() {
    let test = "cache_reregisters_replaced_memory";
    let Some(monitor) = monitor_or_skip(test) else {
        return;
    };
    let Some(ring) = Ring::or_skip(test) else {
        return;
    };
    let buffers = FixedBuffers::new(ring.clone());
    let cache = RegCache::new(&monitor, CacheConfig::default(), buffers.clone());
    let source = temp_file(&[FILL; LEN]);
    let sink = temp_file(&[]);

    let p = buffer(2);
    let old = cache.get(p, LEN).unwrap();
    assert!(old.is_valid());
    let unmaps = monitor.stats().unmaps;

    replace_mapping(p);
    assert!(
        !old.is_valid(),
        "the unmap invalidated the old registration"
    );
    assert!(monitor.stats().unmaps > unmaps);

    let new = cache.get(p, LEN).unwrap();
    assert!(new.is_valid());
    assert_ne!(new.slot, old.slot, "the old slot is still held by `old`");
    assert_ne!(new.serial, old.serial);
    let s = cache.stats();
    assert_eq!(
        (
            s.hits,
            s.misses,
            s.invalidated_found,
            s.registered,
            s.entries
        ),
        (0, 2, 1, 2, 1),
        "{s:?}"
    );

    assert_eq!(ring.read_fixed(&source, p, LEN, new.slot), LEN);
    let now = bytes_at(p);
    assert!(
        all(&now, FILL),
        "the read landed in the new memory: {:02x?}",
        &now[..8]
    );

    // The invalid handle still pins the old pages (which hold OLD, not the read): it must
    // not be used for I/O, and its slot is released when it is dropped, on this thread.
    assert_eq!(ring.write_fixed(&sink, p, LEN, old.slot), LEN);
    assert!(all(&file_bytes(&sink), OLD));
    assert_eq!(buffers.counts.deregistered.load(Ordering::SeqCst), 0);
    let free = buffers.free_slots();
    drop(old);
    assert_eq!(buffers.counts.deregistered.load(Ordering::SeqCst), 1);
    assert_eq!(buffers.free_slots(), free + 1);
    let me = std::thread::current().name().map(str::to_string);
    assert_eq!(*buffers.counts.threads.lock().unwrap(), vec![me]);

    // The new registration is a hit from now on.
    let again = cache.get(p, LEN).unwrap();
    assert_eq!(*again, *new);
    assert_eq!(cache.stats().hits, 1);

    drop((new, again));
    drop(cache);
    assert_eq!(buffers.counts.deregistered.load(Ordering::SeqCst), 2);
    assert_eq!(buffers.free_slots(), SLOTS as usize);
    unmap(p, LEN);
}
