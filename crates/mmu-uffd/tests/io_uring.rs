//! io_uring fixed buffers against memory replaced at the same address (see the example
//! `io_uring_stale`): a registration kept across the replacement moves data to and from
//! the old, pinned pages; the cache invalidates it and registers the new memory instead.

mod common;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use io_uring::{opcode, squeue, types};
use mmu_uffd::io_uring::{FixedBuffer, FixedBufferError, FixedBuffers};
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

/// The library's registrar, counting what it does and on which threads it deregisters.
#[derive(Clone)]
struct Counted {
    buffers: FixedBuffers,
    counts: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    registered: AtomicUsize,
    deregistered: AtomicUsize,
    /// Threads the deregistrations ran on.
    threads: Mutex<Vec<Option<String>>>,
}

impl Counted {
    /// A ring with a sparse table of `SLOTS` fixed buffers, or `None` with the reason
    /// printed.
    fn or_skip(test: &str) -> Option<Counted> {
        match FixedBuffers::with_new_ring(8, SLOTS) {
            Ok(buffers) => Some(Counted {
                buffers,
                counts: Arc::default(),
            }),
            Err(e @ FixedBufferError::Unavailable { .. }) => {
                eprintln!("SKIPPED {test}: {e}");
                None
            }
            Err(e) => panic!("{test}: io_uring setup: {e}"),
        }
    }

    fn free_slots(&self) -> usize {
        self.buffers.free_slots()
    }

    fn run(&self, sqe: squeue::Entry) -> io::Result<usize> {
        let mut uring = self.buffers.ring().lock().unwrap();
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

    fn read_fixed(&self, file: &File, buf: *mut u8, len: usize, index: u16) -> usize {
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::ReadFixed::new(fd, buf, len as u32, index).build())
            .expect("READ_FIXED")
    }

    fn write_fixed(&self, file: &File, buf: *const u8, len: usize, index: u16) -> usize {
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::WriteFixed::new(fd, buf, len as u32, index).build())
            .expect("WRITE_FIXED")
    }
}

impl Registrar for Counted {
    type Registration = FixedBuffer;
    type Error = FixedBufferError;

    fn register(&self, ptr: *mut u8, len: usize) -> Result<FixedBuffer, FixedBufferError> {
        let buf = self.buffers.register(ptr, len)?;
        self.counts.registered.fetch_add(1, Ordering::SeqCst);
        Ok(buf)
    }

    fn deregister(&self, buf: FixedBuffer) {
        let free = self.buffers.free_slots();
        self.buffers.deregister(buf);
        assert_eq!(self.buffers.free_slots(), free + 1, "the slot was emptied");
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
    let Some(buffers) = Counted::or_skip(test) else {
        return;
    };
    let source = temp_file(&[FILL; LEN]);
    let sink = temp_file(&[]);

    let p = buffer(0);
    let stale = buffers.register(p, LEN).unwrap();
    // Sanity: through a live registration, the read lands in the buffer.
    assert_eq!(buffers.read_fixed(&source, p, LEN, stale.index()), LEN);
    assert!(all(&bytes_at(p), FILL));
    // SAFETY: `p` is a live mapping of LEN writable bytes, no I/O in flight.
    unsafe { std::ptr::write_bytes(p, OLD, LEN) };

    replace_mapping(p);
    assert!(all(&bytes_at(p), 0), "new anonymous memory reads zero");
    assert_eq!(
        buffers.read_fixed(&source, p, LEN, stale.index()),
        LEN,
        "the read through the stale slot completes in full"
    );
    let now = bytes_at(p);
    assert!(
        all(&now, 0),
        "the new memory did not receive the read: {:02x?}",
        &now[..8]
    );
    assert_eq!(buffers.write_fixed(&sink, p, LEN, stale.index()), LEN);
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
    let Some(buffers) = Counted::or_skip(test) else {
        return;
    };
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

    assert_eq!(buffers.read_fixed(&source, p, LEN, b.index()), LEN);
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
    let Some(buffers) = Counted::or_skip(test) else {
        return;
    };
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
    assert_ne!(
        new.index(),
        old.index(),
        "the old slot is still held by `old`"
    );
    assert_ne!(new.serial(), old.serial());
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

    assert_eq!(buffers.read_fixed(&source, p, LEN, new.index()), LEN);
    let now = bytes_at(p);
    assert!(
        all(&now, FILL),
        "the read landed in the new memory: {:02x?}",
        &now[..8]
    );

    // The invalid handle still pins the old pages (which hold OLD, not the read): it must
    // not be used for I/O, and its slot is released when it is dropped, on this thread.
    assert_eq!(buffers.write_fixed(&sink, p, LEN, old.index()), LEN);
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

/// The sizing rule: a cache of capacity `SLOTS` never runs the table out by itself (it
/// evicts before it registers), but handles held after their entries were evicted keep
/// their slots, and a `get` past `capacity + held handles` slots fails with `TableFull`.
#[test]
fn slots_bound_the_cache_and_the_held_handles() {
    let test = "slots_bound_the_cache_and_the_held_handles";
    let Some(monitor) = monitor_or_skip(test) else {
        return;
    };
    let Some(buffers) = Counted::or_skip(test) else {
        return;
    };
    let pages = 3 * SLOTS as usize;
    let p = buffer(3);
    // `buffer` maps LEN bytes; this test needs `pages` separate pages.
    unmap(p, LEN);
    let p = map(
        p as usize,
        pages * PAGE,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
        -1,
        0,
    );
    let page = |i: usize| p.wrapping_add(2 * i * PAGE).cast_const();

    // Capacity == slots: many more distinct buffers than slots, no handle kept.
    let config = CacheConfig::default()
        .with_capacity(SLOTS as usize)
        .with_merge(false);
    let cache = RegCache::new(&monitor, config, buffers.clone());
    for round in 0..2 {
        for i in 0..pages / 2 {
            let h = cache
                .get(page(i), PAGE)
                .unwrap_or_else(|e| panic!("round {round}, buffer {i}: {e}"));
            assert!(h.contains(page(i), PAGE));
        }
    }
    assert!(cache.stats().evictions > 0);
    drop(cache);
    assert_eq!(buffers.free_slots(), SLOTS as usize);

    // Capacity 4 and every handle kept: 4 in the index plus 4 evicted but held fill the
    // 8 slots; the next registration finds the table full.
    let cache = RegCache::new(&monitor, config.with_capacity(4), buffers.clone());
    let held: Vec<_> = (0..SLOTS as usize)
        .map(|i| cache.get(page(i), PAGE).unwrap())
        .collect();
    assert_eq!(buffers.free_slots(), 0);
    let err = cache.get(page(SLOTS as usize), PAGE).unwrap_err();
    match &err {
        mmu_uffd::Error::Register { source, .. } => assert!(
            matches!(
                source.downcast_ref::<FixedBufferError>(),
                Some(FixedBufferError::TableFull { slots: SLOTS })
            ),
            "{err:?}"
        ),
        other => panic!("{other:?}"),
    }
    drop(held);
    // The evicted entries' slots came back with their handles (the failed get had evicted
    // one more to make room, so 3 entries remain); the next get fits again.
    assert_eq!(buffers.free_slots(), SLOTS as usize - 3);
    drop(cache.get(page(SLOTS as usize), PAGE).unwrap());
    drop(cache);
    assert_eq!(buffers.free_slots(), SLOTS as usize);
    let c = &buffers.counts;
    assert_eq!(
        c.registered.load(Ordering::SeqCst),
        c.deregistered.load(Ordering::SeqCst)
    );
    unmap(p, pages * PAGE);
}
