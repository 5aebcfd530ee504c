//! Changes of watched memory that no userfaultfd event reports (listed under "not seen by
//! the kernel's events" in the monitor's docs): the entry stays valid, which these tests
//! pin down (if a kernel starts reporting them, the docs must change), and the documented
//! remedy, `RegCache::invalidate`, turns the next lookup into a miss.

mod common;

use common::*;
use mmu_uffd::CacheConfig;

const MADV_GUARD_INSTALL: i32 = 102;

/// madvise(MADV_GUARD_INSTALL) (Linux 6.13) zaps the pages of the range and installs
/// guard markers: the memory the registration pinned is gone from the mapping (access
/// now raises SIGSEGV). No REMOVE event is sent, so the entry stays valid.
#[test]
fn madv_guard_install_is_not_seen_and_invalidate_covers_it() {
    let Some(m) = monitor_or_skip("madv_guard_install_is_not_seen_and_invalidate_covers_it") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    // SAFETY: our own mapping.
    let r = unsafe { libc::madvise(p.cast(), PAGE, MADV_GUARD_INSTALL) };
    if r != 0 {
        eprintln!(
            "SKIPPED: MADV_GUARD_INSTALL: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let valid = h.is_valid();
    let hit_is_same = cache.get(p, 4 * PAGE).map(|h2| *h2 == *h).unwrap_or(false);
    assert!(
        valid && hit_is_same,
        "MADV_GUARD_INSTALL is now reported: update the monitor's list of unseen changes"
    );
    cache.invalidate(p, PAGE).unwrap();
    assert!(!h.is_valid(), "invalidate did not reach the entry");
    drop(h);
    unmap(p, 4 * PAGE);
}

/// fallocate(PUNCH_HOLE) on a memfd frees the pages of its shared mappings without any
/// call on the mapping: no event, the entry stays valid (and a device keeps the old pages).
#[test]
fn memfd_punch_hole_is_not_seen_and_invalidate_covers_it() {
    let Some(m) = monitor_or_skip("memfd_punch_hole_is_not_seen_and_invalidate_covers_it") else {
        return;
    };
    if !m.capabilities().shmem {
        assert!(!monitor_required(), "MMU_UFFD_REQUIRE is set, but no shmem");
        eprintln!("SKIPPED: no shmem");
        return;
    }
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let fd = memfd(4 * PAGE);
    let p = map(0, 4 * PAGE, RW, libc::MAP_SHARED, fd, 0);
    touch(p, 4 * PAGE);
    let h = cache.get(p, 4 * PAGE).unwrap();
    // SAFETY: our own descriptor.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            PAGE as i64,
        )
    };
    assert_eq!(r, 0);
    // SAFETY: mapped, readable.
    let byte = unsafe { p.read_volatile() };
    let valid = h.is_valid();
    assert_eq!(byte, 0, "the hole reads as zeros: the pages changed");
    assert!(
        valid,
        "PUNCH_HOLE is now reported: update the monitor's list of unseen changes"
    );
    cache.invalidate(p, PAGE).unwrap();
    assert!(!h.is_valid(), "invalidate did not reach the entry");
    drop(h);
    unmap(p, 4 * PAGE);
    // SAFETY: ours.
    unsafe { libc::close(fd) };
}
