//! Shutdown: dropping the monitor, a busy applier, a panicking callback.

use super::*;

/// Dropping the monitor: every subscription receives one `Release` over the whole address
/// space, handles go invalid, the cache refuses with `Stopped` (no reason: it stopped on
/// request), and munmap of formerly watched memory does not hang.
#[test]
fn drop_releases_and_stops() {
    let _g = shared();
    let Some(m) = monitor_or_skip("drop_releases_and_stops") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    let (_sub, logp) = record(&m, p, PAGE);
    assert!(m.state() == MonitorState::Running);
    drop(m);
    let release = (0, u64::MAX, Event::Release);
    assert_eq!(log.take(), vec![release]);
    assert_eq!(logp.take(), vec![release]);
    assert!(!h.is_valid());
    match cache.get(p, PAGE) {
        Err(Error::Stopped { why: None }) => {}
        other => panic!("expected Stopped without a reason, got {other:?}"),
    }
    let q = anon(1);
    assert!(matches!(
        cache.get(q, PAGE),
        Err(Error::Stopped { why: None })
    ));
    let (pa, qa) = (p as usize, q as usize);
    within(
        "munmap after the monitor stopped",
        Duration::from_secs(5),
        move || {
            unmap(pa as *mut u8, 4 * PAGE);
            unmap(qa as *mut u8, PAGE);
        },
    );
    assert!(log.take().is_empty());
    drop(h);
    drop(cache);
    assert_eq!(
        counts.registered.load(SeqCst),
        counts.deregistered.load(SeqCst)
    );
}

/// Dropping the monitor while its applier is held in a callback: a second thread's munmap
/// of watched memory still returns (the reader reads its event; the applier is not needed
/// for that), but a lookup of that memory waits at the gate until the event is applied,
/// and the drop (which joins the threads) waits for the callback too. Once the callback
/// returns, the monitor stops, releases every subscription, and everything returns.
#[test]
fn drop_while_the_applier_is_busy() {
    let _g = shared();
    let Some(m) = monitor_or_skip("drop_while_the_applier_is_busy") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let a = anon(1);
    m.watch(a, PAGE).unwrap();
    let open = Arc::new((Mutex::new(false), Condvar::new()));
    let entered = Arc::new(AtomicBool::new(false));
    let _blocker = m
        .subscriptions()
        .insert_interval(
            a as u64..a as u64 + PAGE as u64,
            Blocker {
                open: open.clone(),
                entered: entered.clone(),
            },
        )
        .unwrap();
    let b = anon(4);
    let hb = cache.get(b, 4 * PAGE).unwrap();
    // The first munmap returns once its event is read; the monitor then sits in Blocker.
    unmap(a, PAGE);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !entered.load(SeqCst) {
        assert!(Instant::now() < deadline, "the monitor never ran Blocker");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The second munmap returns although the applier is busy: only the reader was needed.
    let b_addr = b as usize;
    within(
        "a munmap while the applier is busy",
        Duration::from_secs(5),
        move || unmap(b_addr as *mut u8, 4 * PAGE),
    );
    // A query of that memory waits at the gate: the event is read, not applied.
    let checked = Arc::new(AtomicBool::new(false));
    let checker = {
        let checked = checked.clone();
        std::thread::spawn(move || {
            let valid = hb.is_valid();
            checked.store(true, SeqCst);
            valid
        })
    };
    // Drop on another thread: it joins the applier, held by Blocker.
    let dropped = Arc::new(AtomicBool::new(false));
    let dropper = {
        let dropped = dropped.clone();
        std::thread::spawn(move || {
            drop(m);
            dropped.store(true, SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !checked.load(SeqCst),
        "a query passed the gate before the munmap's event was applied"
    );
    assert!(
        !dropped.load(SeqCst),
        "drop returned while the applier was busy"
    );
    {
        let (lock, cv) = &*open;
        *lock.lock() = true;
        cv.notify_all();
    }
    let valid = within(
        "the waiting query and the drop",
        Duration::from_secs(5),
        move || {
            dropper.join().unwrap();
            checker.join().unwrap()
        },
    );
    assert!(!valid, "the unmapped registration was reported valid");
    assert!(dropped.load(SeqCst));
    let seen = log.take();
    eprintln!("drop_while_the_applier_is_busy: {seen:x?}");
    assert_eq!(seen.first(), Some(&ev(a, 0, 1, Event::Unmap)));
    assert_eq!(seen.last(), Some(&(0, u64::MAX, Event::Release)));
    assert!(
        seen.len() == 2
            || seen
                == vec![
                    ev(a, 0, 1, Event::Unmap),
                    ev(b, 0, 4, Event::Unmap),
                    (0, u64::MAX, Event::Release)
                ],
        "{seen:x?}"
    );
    assert!(matches!(
        cache.get(a, PAGE),
        Err(Error::Stopped { why: None })
    ));
}

/// Regression test (fixed in ea3d6d1: `watch` always registers). `watch` used to answer
/// from a "watched set" that still held a range whose unmap the kernel had already done but
/// the monitor had not applied yet (the kernel frees the address, drops the mmap lock, and
/// only then queues the UNMAP event and waits for it to be read). New memory mapped at that
/// address in that window was reported as watched (`watch` returned `Ok` without a system
/// call) but was not registered with the kernel, so its unmap was never reported. Made
/// deterministic by holding the monitor in a callback while the first unmap waits.
///
/// Through the cache the same window gave: a thread maps memory where another thread's
/// unmap is still unreported, `get` fills without registering, the thread's own munmap then
/// produces no event and returns, and its handle stays valid (seen with four threads
/// sharing the address space, a few times per thousand rounds).
#[test]
fn watch_while_an_unmap_is_unreported_still_registers() {
    let _g = shared();
    let Some(m) = monitor_or_skip("watch_while_an_unmap_is_unreported_still_registers") else {
        return;
    };
    // A call that waits for the monitor while `Blocker` holds it would hang for ever.
    let _dog = Watchdog::new(
        "watch_while_an_unmap_is_unreported_still_registers",
        Duration::from_secs(30),
    );
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let a = anon(1);
    m.watch(a, PAGE).unwrap();
    let open = Arc::new((Mutex::new(false), Condvar::new()));
    let entered = Arc::new(AtomicBool::new(false));
    let _blocker = m
        .subscriptions()
        .insert_interval(
            a as u64..a as u64 + PAGE as u64,
            Blocker {
                open: open.clone(),
                entered: entered.clone(),
            },
        )
        .unwrap();
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    // Counted now: `Monitor::stats` syncs, which would wait for the monitor held below.
    let before = m.stats();
    // Hold the monitor thread in a callback.
    unmap(a, PAGE);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !entered.load(SeqCst) {
        assert!(Instant::now() < deadline, "the monitor never ran Blocker");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Another thread unmaps p: the address is free at once, the event waits unread.
    let pa = p as usize;
    let t = std::thread::spawn(move || unmap(pa as *mut u8, 4 * PAGE));
    // New memory at the same address (MAP_FIXED_NOREPLACE: only once it is free).
    let deadline = Instant::now() + Duration::from_secs(5);
    let q = loop {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; it fails while p's old
        // mapping is still there.
        let r = unsafe {
            libc::mmap(
                p.cast(),
                4 * PAGE,
                RW,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            break r.cast::<u8>();
        }
        assert!(Instant::now() < deadline, "p was never unmapped");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(q, p);
    m.watch(q, 4 * PAGE).unwrap();
    {
        let (lock, cv) = &*open;
        *lock.lock() = true;
        cv.notify_all();
    }
    within("the first unmap", Duration::from_secs(5), move || {
        t.join().unwrap()
    });
    // The only registration since `before` is `watch(q)`.
    let after = m.stats();
    assert_eq!(
        after.watch_registrations,
        before.watch_registrations + 1,
        "watch() must register the new memory"
    );
    // Both earlier unmaps are applied now.
    let s = fence(&cache);
    assert_eq!(
        log.take(),
        vec![ev(a, 0, 1, Event::Unmap), ev(p, 0, 4, Event::Unmap), s]
    );
    unmap(q, 4 * PAGE);
    let s = fence(&cache);
    let seen = log.take();
    assert_eq!(
        seen,
        vec![ev(q, 0, 4, Event::Unmap), s],
        "watch() returned Ok for the new memory (registrations {} -> {}), \
         yet its unmap was not reported",
        before.watch_registrations,
        after.watch_registrations
    );
}

/// A subscriber that panics on `Unmap`.
struct Bomb;

impl IntervalSubscriber for Bomb {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        if r.event() == Event::Unmap {
            panic!("test subscriber refuses an unmap");
        }
        Ok(())
    }
}

/// A panicking callback stops the monitor with a reason; nothing hangs, lookups fail with
/// that reason, subscribers are released.
#[test]
fn panicking_callback_stops_the_monitor() {
    let _g = shared();
    let Some(m) = monitor_or_skip("panicking_callback_stops_the_monitor") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    let q = anon(2);
    let hq = cache.get(q, 2 * PAGE).unwrap();
    let _bomb = m
        .subscriptions()
        .insert_interval(p as u64..p as u64 + 4 * PAGE as u64, Bomb)
        .unwrap();
    unmap(p, 4 * PAGE);
    assert!(!h.is_valid());
    assert!(!hq.is_valid(), "a stopped monitor vouches for nothing");
    let why = match m.state() {
        MonitorState::Failed(why) => why,
        other => panic!("expected a stop with a reason, got {other:?}"),
    };
    assert!(
        why.contains("panicked") && why.contains("test subscriber refuses an unmap"),
        "{why}"
    );
    match cache.get(q, PAGE) {
        Err(Error::Stopped { why: Some(w) }) => assert_eq!(w, why),
        other => panic!("expected Stopped with the reason, got {other:?}"),
    }
    assert!(matches!(m.watch(q, PAGE), Err(Error::Stopped { .. })));
    let qa = q as usize;
    within(
        "munmap after the monitor died",
        Duration::from_secs(5),
        move || unmap(qa as *mut u8, 2 * PAGE),
    );
    // `state()` answers as soon as the gate is closed; the Release is delivered after
    // that, on the monitor thread, which dropping the monitor joins.
    drop(m);
    let seen = log.take();
    eprintln!("panicking_callback_stops_the_monitor: {seen:x?}");
    assert_eq!(seen.last(), Some(&(0, u64::MAX, Event::Release)));
    assert!(
        seen.len() == 1 || seen == vec![ev(p, 0, 4, Event::Unmap), (0, u64::MAX, Event::Release)],
        "{seen:x?}"
    );
}
