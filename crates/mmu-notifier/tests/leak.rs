//! An address space leaves nothing behind: after many are created, given subscribers and
//! dropped, the heap holds what it held before. A counting global allocator sees every
//! thread's allocations (the grace-period worker frees retired snapshots), so this binary
//! holds this one test only.
#![cfg(not(loom))]

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use std::sync::Arc;

use counting_alloc::{global_live, Counting};
use mmu_notifier::{ListSubscriber, Subscriptions};

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
    let before = global_live();
    lifetimes(1000);
    // Retired snapshots are freed after a grace period, possibly on the worker thread.
    let mut grown = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        grown = global_live() - before;
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
