//! An address space leaves nothing behind: after many are created, given subscribers and
//! dropped, the heap holds what it held before. A counting global allocator sees every
//! thread's allocations (the grace-period worker frees retired snapshots), so this binary
//! holds this one test only.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;

use mmu_notifier::{ListSubscriber, Subscriptions};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's layout and pointer; the
// counter is a side effect only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: the caller's contract for `alloc` is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation is).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, checked by it.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Noop;
impl ListSubscriber for Noop {}

fn lifetimes(n: usize) {
    for _ in 0..n {
        let mm = Subscriptions::new();
        let a = mm.register(Arc::new(Noop)).unwrap();
        let b = mm.register(Arc::new(Noop)).unwrap();
        drop(a);
        drop(mm.invalidate_range_start(
            mmu_notifier::Range::new(0, 4096, mmu_notifier::Event::Unmap).unwrap(),
        ));
        drop(b);
        drop(mm);
    }
}

#[test]
fn dropped_address_spaces_leave_nothing_behind() {
    lifetimes(10); // thread-locals, the worker, lazily built statics
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = LIVE.load(Relaxed);
    lifetimes(1000);
    // Retired snapshots are freed after a grace period, possibly on the worker thread.
    let mut grown = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        grown = LIVE.load(Relaxed) - before;
        if grown < 4096 {
            break;
        }
    }
    println!("1000 address spaces later the heap holds {grown} more bytes");
    assert!(
        grown < 4096,
        "1000 dropped address spaces left {grown} bytes behind"
    );
}
