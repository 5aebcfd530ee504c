//! What watching refuses, and how.

use super::*;

#[test]
fn watch_errors() {
    // Alone: it watches freed and holed ranges, which another test could map meanwhile.
    let _g = exclusive();
    let Some(m) = monitor_or_skip("watch_errors") else {
        return;
    };
    let p = anon(3);
    match m.watch(p, 0) {
        Err(Error::InvalidRange { start, len: 0, .. }) => assert_eq!(start, p as u64),
        other => panic!("len 0: {other:?}"),
    }
    let top = usize::MAX - 100;
    assert!(matches!(
        m.watch(top as *const u8, 4096),
        Err(Error::InvalidRange { .. })
    ));
    // Page-aligned at the very top: the range fits, widening it to pages overflows.
    let last_page = usize::MAX - PAGE + 1;
    assert!(matches!(
        m.watch(last_page as *const u8, 1),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(m.unwatch(p, 0), Err(Error::InvalidRange { .. })));
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    assert!(matches!(cache.get(p, 0), Err(Error::InvalidRange { .. })));
    assert!(matches!(
        cache.get(top as *const u8, 4096),
        Err(Error::InvalidRange { .. })
    ));

    // Unmapped memory.
    let u = anon(4);
    unmap(u, 4 * PAGE);
    match m.watch(at(u, 0).wrapping_add(10), 2 * PAGE) {
        Err(Error::Watch { start, end, source }) => {
            assert_eq!((start, end), (u as u64, u as u64 + 3 * PAGE as u64));
            eprintln!(
                "watch of unmapped memory: {source} ({:?})",
                source.raw_os_error()
            );
        }
        other => panic!("unmapped: {other:?}"),
    }
    // A hole inside the range.
    unmap(at(p, 1), PAGE);
    match m.watch(p, 3 * PAGE) {
        Err(Error::Watch { start, end, source }) => {
            assert_eq!((start, end), (p as u64, p as u64 + 3 * PAGE as u64));
            eprintln!("watch over a hole: {source} ({:?})", source.raw_os_error());
        }
        other => panic!("hole: {other:?}"),
    }
    assert!(matches!(cache.get(p, 3 * PAGE), Err(Error::Watch { .. })));
    // Kernel addresses.
    match m.watch(0xffff_8000_0000_0000usize as *const u8, PAGE) {
        Err(e @ (Error::Watch { .. } | Error::InvalidRange { .. })) => {
            eprintln!("watch of a kernel address: {e}");
        }
        other => panic!("kernel address: {other:?}"),
    }
    // No user registration was made; the monitor runs on.
    assert_eq!(counts.registered.load(SeqCst), 0);
    assert!(m.state() == MonitorState::Running);
    let st = m.stats();
    assert_eq!(st.invalidations, 0, "{st:?}");
    // And it still works.
    let (_all, log) = record_all(&m);
    let h = cache.get(p, PAGE).unwrap();
    unmap(p, PAGE);
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 1, Event::Unmap)]);
    // The refused watch over the hole left page 2 registered with the kernel (UFFDIO_REGISTER
    // registers the mapped parts of a range with holes; `watch` finds the hole afterwards
    // and does not undo it): its unmap is reported although `watch` failed. Harmless (an
    // extra invalidation), noted rather than required.
    unmap(at(p, 2), PAGE);
    let s = fence(&cache);
    let seen = log.take();
    assert!(
        seen == vec![s] || seen == vec![ev(p, 2, 3, Event::Unmap), s],
        "{seen:x?}"
    );
    eprintln!(
        "watch_errors: unmap of the mapped part of a refused range reported: {}",
        seen.len() == 2
    );
}

/// This process's userfaultfd descriptors.
fn userfaultfds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            target
                .to_string_lossy()
                .contains("userfaultfd")
                .then(|| e.file_name().to_string_lossy().parse().ok())?
        })
        .collect();
    fds.sort();
    fds
}

/// The monitor registers watched memory for write-protect faults but never protects
/// anything, so no fault is expected. If a page gets protected anyway (another user of the
/// descriptor), a thread writing to it must not stay blocked: on kernels with asynchronous
/// write-protection the kernel lifts the protection itself; on older ones the monitor's
/// reader gets the fault, unprotects the page and wakes the thread. Here the test protects
/// a watched page through the monitor's descriptor and writes to it.
#[test]
fn an_unexpected_write_protect_fault_is_answered() {
    // Alone: the monitor's descriptor is told apart from other tests' by appearing.
    let _g = exclusive();
    let before = userfaultfds();
    let Some(m) = monitor_or_skip("an_unexpected_write_protect_fault_is_answered") else {
        return;
    };
    let fd = match userfaultfds()
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect::<Vec<_>>()[..]
    {
        [fd] => fd,
        ref other => panic!("the monitor's descriptor among {other:?}"),
    };
    let p = anon(1);
    touch(p, PAGE); // only a present page can be write-protected
    m.watch(p, PAGE).unwrap();
    // _IOWR(0xAA, 0x06, struct uffdio_writeprotect): range, then mode 1 (protect).
    const WRITEPROTECT: u64 = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x06;
    let mut wp = [p as u64, PAGE as u64, 1];
    // SAFETY: UFFDIO_WRITEPROTECT reads and writes three u64 in a live array.
    let r = unsafe { libc::ioctl(fd, WRITEPROTECT as _, wp.as_mut_ptr()) };
    assert_eq!(r, 0, "UFFDIO_WRITEPROTECT: {}", io::Error::last_os_error());
    let faults = m.stats().unexpected_faults;
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = p as usize;
    std::thread::spawn(move || {
        // SAFETY: a live private anonymous page of this test.
        unsafe { (addr as *mut u64).write_volatile(7) };
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "a thread that hit a write-protect fault on watched memory stayed blocked"
    );
    // With asynchronous write-protection (Linux 6.7+, what `any_memory` reports) the kernel
    // lifts the protection itself and the monitor hears nothing; before, its reader does.
    let answered_by_monitor = !m.capabilities().any_memory;
    assert_eq!(
        m.stats().unexpected_faults,
        faults + u64::from(answered_by_monitor)
    );
    // SAFETY: as above; the write went through.
    assert_eq!(unsafe { (p as *const u64).read_volatile() }, 7);
    unmap(p, PAGE);
}
