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
//! Run with `cargo run -p mmu-uffd --example io_uring_stale`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, squeue, types, IoUring};
use mmu_uffd::{CacheConfig, Error, Monitor, RegCache, Registrar};

/// Slots of the sparse fixed-buffer table.
const SLOTS: u32 = 8;
/// What the source file holds.
const FILL: u8 = 0xab;
/// What the original buffer is filled with before any I/O.
const OLD: u8 = 0x5a;

/// One io_uring fixed buffer: its slot in the ring's table and a serial number that tells
/// registrations apart when a slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FixedBuf {
    slot: u16,
    serial: u64,
}

/// A ring shared by the registrar (which runs on whatever thread calls `get` or drops the
/// last handle) and the code doing I/O.
struct Ring {
    uring: Mutex<IoUring>,
}

impl Ring {
    /// A ring with a sparse table of `SLOTS` fixed buffers, or why io_uring cannot be used.
    fn new() -> io::Result<Ring> {
        let uring = IoUring::new(8)?;
        uring.submitter().register_buffers_sparse(SLOTS)?;
        Ok(Ring {
            uring: Mutex::new(uring),
        })
    }

    /// Points `slot` at `iov` (an empty iovec empties the slot, unpinning its pages).
    fn update_slot(&self, slot: u16, iov: libc::iovec) -> io::Result<()> {
        let uring = self.uring.lock().unwrap();
        // SAFETY: the kernel validates the iovec and pins the pages behind it (or, for the
        // empty iovec, releases the slot); from then on it uses the pinned pages and never
        // reads `iov_base` again, so nothing in this process is accessed through it later,
        // whatever happens to the mapping (replacing that mapping is what this demo does).
        unsafe {
            uring
                .submitter()
                .register_buffers_update(slot.into(), &[iov], None)
        }
    }

    /// Submits one fixed-buffer operation and waits for its completion: its result.
    fn run(&self, sqe: squeue::Entry) -> io::Result<usize> {
        let mut uring = self.uring.lock().unwrap();
        // SAFETY: the buffers of the operations built below are live mappings of at least
        // the requested length, and this function waits for the completion before it
        // returns (holding the ring, so no other operation is in flight).
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

    /// `READ_FIXED` of `len` bytes at offset 0 of `file` into `buf`, through `slot`.
    fn read_fixed(&self, file: &File, buf: *mut u8, len: usize, slot: u16) -> io::Result<usize> {
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::ReadFixed::new(fd, buf, len as u32, slot).build())
    }

    /// `WRITE_FIXED` of `len` bytes from `buf`, through `slot`, to offset 0 of `file`.
    fn write_fixed(&self, file: &File, buf: *const u8, len: usize, slot: u16) -> io::Result<usize> {
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::WriteFixed::new(fd, buf, len as u32, slot).build())
    }
}

/// Registers ranges as fixed buffers, one slot each.
#[derive(Clone)]
struct FixedBuffers {
    ring: Arc<Ring>,
    free: Arc<Mutex<Vec<u16>>>,
    serial: Arc<AtomicU64>,
    deregistered: Arc<AtomicUsize>,
}

impl FixedBuffers {
    fn new(ring: Arc<Ring>) -> Self {
        FixedBuffers {
            ring,
            // Popped from the back: slot 0 first.
            free: Arc::new(Mutex::new((0..SLOTS as u16).rev().collect())),
            serial: Arc::new(AtomicU64::new(1)),
            deregistered: Arc::new(AtomicUsize::new(0)),
        }
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
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        Ok(FixedBuf { slot, serial })
    }

    fn deregister(&self, buf: FixedBuf) {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        match self.ring.update_slot(buf.slot, empty) {
            Ok(()) => self.free.lock().unwrap().push(buf.slot),
            // Leak the slot rather than reuse one that may still hold pages.
            Err(e) => eprintln!("cannot empty slot {}: {e}", buf.slot),
        }
        self.deregistered.fetch_add(1, Ordering::Relaxed);
        println!(
            "   (deregister: slot {} emptied, serial {}, on thread {:?})",
            buf.slot,
            buf.serial,
            std::thread::current().name().unwrap_or("unnamed")
        );
    }
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
    let ring = match Ring::new() {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("SKIPPED io_uring_stale: io_uring with a sparse fixed-buffer table is unavailable: {e}");
            return Ok(());
        }
    };
    let len = 2 * page_size();
    let source = temp_file("source", &vec![FILL; len])?;
    let buffers = FixedBuffers::new(ring.clone());

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
        stale.slot, stale.serial
    );
    replace_mapping(p, len)?;
    println!("   munmap, then mmap(MAP_FIXED_NOREPLACE): new anonymous memory at {p:p}");
    let n = ring.read_fixed(&source, p, len, stale.slot)?;
    println!(
        "   READ_FIXED  source -> slot {} at {p:p}: completed, {n} bytes",
        stale.slot
    );
    println!(
        "   bytes at {p:p} now:   {}   <- the read did not land here",
        show(&bytes_at(p, len))
    );
    let sink = temp_file("sink", &[])?;
    let n = ring.write_fixed(&sink, p, len, stale.slot)?;
    println!(
        "   WRITE_FIXED slot {} at {p:p} -> sink file: completed, {n} bytes",
        stale.slot
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
        old.slot, old.serial
    );
    let again = cache.get(p, len)?;
    let s = cache.stats();
    println!(
        "   get again        -> slot {}, serial {} (hit: same registration; hits {}, misses {}, registered {})",
        again.slot, again.serial, s.hits, s.misses, s.registered
    );
    drop(again);
    replace_mapping(p, len)?;
    println!("   munmap, then mmap(MAP_FIXED_NOREPLACE): new anonymous memory at {p:p}");
    println!(
        "   old handle (slot {}): is_valid() = {}; the monitor applied {} UNMAP event(s)",
        old.slot,
        old.is_valid(),
        monitor.stats().unmaps
    );
    let new = cache.get(p, len)?;
    let s = cache.stats();
    println!(
        "   get              -> slot {}, serial {} (miss; hits {}, misses {}, invalidated_found {}, registered {})",
        new.slot, new.serial, s.hits, s.misses, s.invalidated_found, s.registered
    );
    let n = ring.read_fixed(&source, p, len, new.slot)?;
    println!(
        "   READ_FIXED  source -> slot {} at {p:p}: completed, {n} bytes",
        new.slot
    );
    println!(
        "   bytes at {p:p} now:   {}   <- landed in the new memory",
        show(&bytes_at(p, len))
    );
    println!(
        "   dropping the old handle releases slot {} (still pinning the old pages until now):",
        old.slot
    );
    drop(old);
    drop(new);
    drop(cache);
    // SAFETY: unmaps the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p.cast(), len) };
    println!(
        "done: {} registrations made, {} released",
        buffers.serial.load(Ordering::Relaxed) - 1,
        buffers.deregistered.load(Ordering::Relaxed)
    );
    Ok(())
}
