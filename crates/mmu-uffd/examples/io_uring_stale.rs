//! io_uring fixed buffers go stale when the memory under them is replaced; [`RegCache`]
//! notices.
//!
//! A fixed buffer pins the *pages* behind an address range when it is registered. If the
//! application then unmaps the range and maps new memory at the same address, the
//! registration still accepts I/O at that address (the kernel only checks the address
//! against the registered range), but the data moves to and from the old, pinned pages:
//! reads "succeed" and the new memory never sees them.
//!
//! Part 1 shows that with a registration kept and used directly. Part 2 does the same
//! through a [`RegCache`] on a [`Monitor`]: the unmap invalidates the cached entry, the next
//! `get` registers the new memory in another slot, and the read lands where it should.
//!
//! The registrations are made by [`FixedBuffers`], the crate's io_uring registrar (feature
//! `io-uring`, which this crate's examples and tests always build with).
//!
//! Run with `cargo run -p mmu-uffd --example io_uring_stale`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, squeue, types, IoUring};
use mmu_uffd::io_uring::{FixedBufferError, FixedBuffers};
use mmu_uffd::{CacheConfig, Error, Monitor, RegCache, Registrar};

/// Slots of the sparse fixed-buffer table.
const SLOTS: u32 = 8;
/// What the source file holds.
const FILL: u8 = 0xab;
/// What the original buffer is filled with before any I/O.
const OLD: u8 = 0x5a;

/// Submits one fixed-buffer operation on `ring` and waits for its completion: its result.
fn run(ring: &Mutex<IoUring>, sqe: squeue::Entry) -> io::Result<usize> {
    let mut ring = ring.lock().unwrap();
    // SAFETY: the buffers of the operations built below are live mappings of at least the
    // requested length, and this function waits for the completion before it returns
    // (holding the ring, so no other operation is in flight).
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| io::Error::other("submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if let Some(cqe) = ring.completion().next() {
            return match cqe.result() {
                r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                r => Ok(r as usize),
            };
        }
    }
}

/// `READ_FIXED` of `len` bytes at offset 0 of `file` into `buf`, through slot `index`.
fn read_fixed(
    ring: &Mutex<IoUring>,
    file: &File,
    buf: *mut u8,
    len: usize,
    index: u16,
) -> io::Result<usize> {
    let fd = types::Fd(file.as_raw_fd());
    run(
        ring,
        opcode::ReadFixed::new(fd, buf, len as u32, index).build(),
    )
}

/// `WRITE_FIXED` of `len` bytes from `buf`, through slot `index`, to offset 0 of `file`.
fn write_fixed(
    ring: &Mutex<IoUring>,
    file: &File,
    buf: *const u8,
    len: usize,
    index: u16,
) -> io::Result<usize> {
    let fd = types::Fd(file.as_raw_fd());
    run(
        ring,
        opcode::WriteFixed::new(fd, buf, len as u32, index).build(),
    )
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// An anonymous private read-write mapping of `len` bytes: anywhere (`at` = null) or at
/// exactly `at`, which must be free (`MAP_FIXED_NOREPLACE`).
fn map_anon(at: *mut u8, len: usize) -> io::Result<*mut u8> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if !at.is_null() {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: a new anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing one.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if !at.is_null() && p != at.cast() {
        // Kernels before 4.17 take MAP_FIXED_NOREPLACE as a mere hint.
        // SAFETY: unmaps the mapping just made.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::other("the address was not available again"));
    }
    Ok(p.cast())
}

/// Unmaps `[p, p + len)` and maps new anonymous memory at the same address.
fn replace_mapping(p: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the mapping belongs to this program; no reference into it is alive and no I/O
    // uses it (the fixed buffer holds the pages, not the mapping).
    if unsafe { libc::munmap(p.cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    map_anon(p, len).map(drop)
}

/// A copy of the `len` bytes at `p`.
fn bytes_at(p: *const u8, len: usize) -> Vec<u8> {
    // SAFETY: callers pass a live, readable mapping of `len` bytes that no I/O is writing.
    unsafe { std::slice::from_raw_parts(p, len) }.to_vec()
}

/// "ab ab ab ab ab ab ab ab … (all 8192 bytes are 0xab)".
fn show(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let tail = match bytes.first() {
        Some(&b) if bytes.iter().all(|&x| x == b) => {
            format!("all {} bytes are {b:#04x}", bytes.len())
        }
        _ => format!(
            "{} bytes, {} of them {FILL:#04x}",
            bytes.len(),
            bytes.iter().filter(|&&x| x == FILL).count()
        ),
    };
    format!("{} … ({tail})", head.join(" "))
}

/// A temporary file (already unlinked) holding `contents`.
fn temp_file(tag: &str, contents: &[u8]) -> io::Result<File> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "mmu-uffd-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    file.write_all_at(contents, 0)?;
    Ok(file)
}

fn file_bytes(file: &File, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    file.read_exact_at(&mut v, 0)?;
    Ok(v)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let monitor = match Monitor::new() {
        Ok(m) => m,
        Err(e @ (Error::Unavailable { .. } | Error::MissingFeature { .. })) => {
            eprintln!("SKIPPED io_uring_stale: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    // A ring in a mutex (shared by the registrar, which runs on whatever thread calls `get`
    // or drops the last handle, and the code doing I/O) with a sparse fixed-buffer table.
    let buffers = match FixedBuffers::with_new_ring(8, SLOTS) {
        Ok(b) => b,
        Err(e @ FixedBufferError::Unavailable { .. }) => {
            eprintln!("SKIPPED io_uring_stale: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let ring = buffers.ring().clone();
    let len = 2 * page_size();
    let source = temp_file("source", &vec![FILL; len])?;

    println!("io_uring fixed buffers and memory replaced under them");
    println!(
        "ring: {SLOTS}-slot sparse fixed-buffer table; source file: {len} bytes of {FILL:#04x}"
    );
    println!();

    // ---- Part 1: a registration kept and used directly. ----------------------------------
    println!("1. Without invalidation (the registration is kept and used directly)");
    let p = map_anon(std::ptr::null_mut(), len)?;
    // SAFETY: `p` is a fresh mapping of `len` writable bytes.
    unsafe { std::ptr::write_bytes(p, OLD, len) };
    let stale = buffers.register(p, len)?;
    println!(
        "   buffer {p:p} (+{len}) filled with {OLD:#04x}, registered: slot {}, serial {}",
        stale.index(),
        stale.serial()
    );
    replace_mapping(p, len)?;
    println!("   munmap, then mmap(MAP_FIXED_NOREPLACE): new anonymous memory at {p:p}");
    let n = read_fixed(&ring, &source, p, len, stale.index())?;
    println!(
        "   READ_FIXED  source -> slot {} at {p:p}: completed, {n} bytes",
        stale.index()
    );
    println!(
        "   bytes at {p:p} now:   {}   <- the read did not land here",
        show(&bytes_at(p, len))
    );
    let sink = temp_file("sink", &[])?;
    let n = write_fixed(&ring, &sink, p, len, stale.index())?;
    println!(
        "   WRITE_FIXED slot {} at {p:p} -> sink file: completed, {n} bytes",
        stale.index()
    );
    println!(
        "   sink file holds:     {}   <- the data went to the old, pinned pages",
        show(&file_bytes(&sink, len)?)
    );
    buffers.deregister(stale);
    // SAFETY: unmaps the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p.cast(), len) };
    println!();

    // ---- Part 2: the same through the registration cache. --------------------------------
    println!("2. With RegCache on a Monitor");
    let cache = RegCache::new(&monitor, CacheConfig::default(), buffers.clone());
    let p = map_anon(std::ptr::null_mut(), len)?;
    // SAFETY: `p` is a fresh mapping of `len` writable bytes.
    unsafe { std::ptr::write_bytes(p, OLD, len) };
    let old = cache.get(p, len)?;
    println!(
        "   buffer {p:p} (+{len}) filled with {OLD:#04x}; get -> slot {}, serial {} (miss: registered)",
        old.index(), old.serial()
    );
    let again = cache.get(p, len)?;
    let s = cache.stats();
    println!(
        "   get again        -> slot {}, serial {} (hit: same registration; hits {}, misses {}, registered {})",
        again.index(), again.serial(), s.hits, s.misses, s.registered
    );
    drop(again);
    replace_mapping(p, len)?;
    println!("   munmap, then mmap(MAP_FIXED_NOREPLACE): new anonymous memory at {p:p}");
    println!(
        "   old handle (slot {}): is_valid() = {}; the monitor applied {} UNMAP event(s)",
        old.index(),
        old.is_valid(),
        monitor.stats().unmaps
    );
    let new = cache.get(p, len)?;
    let s = cache.stats();
    println!(
        "   get              -> slot {}, serial {} (miss; hits {}, misses {}, invalidated_found {}, registered {})",
        new.index(), new.serial(), s.hits, s.misses, s.invalidated_found, s.registered
    );
    let n = read_fixed(&ring, &source, p, len, new.index())?;
    println!(
        "   READ_FIXED  source -> slot {} at {p:p}: completed, {n} bytes",
        new.index()
    );
    println!(
        "   bytes at {p:p} now:   {}   <- landed in the new memory",
        show(&bytes_at(p, len))
    );
    let free = buffers.free_slots();
    let old_slot = old.index();
    drop(old);
    println!(
        "   dropping the old handle released slot {old_slot} (which pinned the old pages until now), on this thread: free slots {free} -> {}",
        buffers.free_slots()
    );
    drop(new);
    drop(cache);
    // SAFETY: unmaps the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p.cast(), len) };
    println!(
        "done: all {} slots free again ({} registrations made through the cache)",
        buffers.free_slots(),
        s.registered
    );
    Ok(())
}
