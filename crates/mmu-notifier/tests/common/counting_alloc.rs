//! A counting global allocator for the memory tests. Each test binary that uses it
//! installs it (`#[global_allocator]`) and reads one of two counts of live bytes:
//!
//! - [`thread_live`]: what the calling thread allocated minus what it freed while its
//!   counting was on ([`count_this_thread`]); tests running in parallel do not see each
//!   other's allocations;
//! - [`global_live`]: every thread's, always on; for memory freed on another thread
//!   (a grace-period worker), in a binary that holds one test only.

#![allow(dead_code)] // Each binary reads one of the two counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

/// The system allocator, counting.
pub struct Counting;

static GLOBAL: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    GLOBAL.fetch_add(bytes, Relaxed);
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = LIVE.try_with(|l| l.set(l.get() + bytes));
        }
    });
}

/// Turns the calling thread's count on or off.
pub fn count_this_thread(on: bool) {
    COUNTING.with(|c| c.set(on));
}

/// The calling thread's live bytes (see the module docs).
pub fn thread_live() -> isize {
    LIVE.with(Cell::get)
}

/// Every thread's live bytes.
pub fn global_live() -> isize {
    GLOBAL.load(Relaxed)
}

// SAFETY: every call is forwarded to `System` with the caller's layout and pointer; the
// counters are a side effect only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract for `alloc` is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation is).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, checked by it.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
