//! `Monitor::unwatch` of memory a cache entry still covers: the entry's part stays
//! registered until the entry goes, so a replacement of that memory made while `unwatch`
//! is still invalidating sends its event, and a lookup that starts after the replacement
//! returned never gets the old registration.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, WouldBlock};
use mmu_uffd::CacheConfig;

/// Holds the thread running a `Clear` invalidation until `open`.
struct HoldClear {
    entered: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
}

impl IntervalSubscriber for HoldClear {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        if r.event() == Event::Clear {
            self.entered.store(true, Ordering::SeqCst);
            let t = Instant::now();
            while !self.open.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(10) {
                std::thread::yield_now();
            }
        }
        Ok(())
    }
}

#[test]
fn unwatch_racing_a_replacement_gives_no_stale_hit() {
    let Some(m) = monitor_or_skip("unwatch_racing_a_replacement_gives_no_stale_hit") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    // SAFETY: inside the mapping.
    let q = unsafe { p.add(2 * PAGE) };
    let old = cache.get(q, 2 * PAGE).unwrap();
    let old_reg = *old;
    drop(old);
    let entered = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicBool::new(false));
    // Starts below the entry: visited first by the Clear (the tree is walked by start).
    let _hold = m
        .subscriptions()
        .insert_interval(
            p as u64..p as u64 + 4 * PAGE as u64,
            HoldClear {
                entered: entered.clone(),
                open: open.clone(),
            },
        )
        .unwrap();
    std::thread::scope(|s| {
        let mm = &m;
        let pa = p as usize;
        let unwatcher = s.spawn(move || mm.unwatch(pa as *const u8, 4 * PAGE));
        while !entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // `unwatch` has unregistered the range and is invalidating it. Replace the
        // entry's memory with new memory, as an allocator recycling the address would.
        replace_with(q, 2 * PAGE, 0x1234);
        // munmap/mremap returned: a lookup starting now must not get the old registration.
        // (With the range still registered the replacement's event waits behind the held
        // Clear, and so does the lookup at the gate: release the hold shortly.)
        let qa = q as usize;
        let cache = &cache;
        let lookup = s.spawn(move || *cache.get(qa as *const u8, 2 * PAGE).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        open.store(true, Ordering::SeqCst);
        let stale = lookup.join().unwrap() == old_reg;
        unwatcher.join().unwrap().unwrap();
        assert!(
            !stale,
            "a lookup that started after the mapping was replaced returned the registration \
             of the old memory ({old_reg:x?}): unwatch had unregistered the range but not yet \
             invalidated the entry, so the replacement sent no event"
        );
    });
    unmap(p, 4 * PAGE);
}
