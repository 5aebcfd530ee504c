//! What an interval subscription costs in memory, measured at the allocator:
//! `IntervalSubscription::memory_overhead` must be what the heap actually pays per
//! subscription (not only a formula under 100 bytes), and that must stay under 100 bytes.
//!
//! The counting allocator keeps one count per thread, so tests running in parallel do not
//! see each other's allocations.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{count_this_thread, thread_live as live, Counting};
use mmu_notifier::srcu::Srcu;
use mmu_notifier::{
    IntervalContext, IntervalSubscriber, IntervalSubscription, Range, Subscriptions, WouldBlock,
};

#[global_allocator]
static ALLOC: Counting = Counting;

struct Word(#[allow(dead_code)] u64);

impl IntervalSubscriber for Word {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        Ok(())
    }
}

/// The allocator's live bytes after each of `n` inserts of one-page subscriptions.
fn live_bytes_after_each_insert(
    mm: &Subscriptions,
    n: u64,
) -> (Vec<isize>, Vec<IntervalSubscription<Word>>) {
    const P: u64 = 4096;
    let mut subs = Vec::with_capacity(n as usize);
    let mut after = Vec::with_capacity(n as usize);
    count_this_thread(true);
    for i in 0..n {
        subs.push(
            mm.insert_interval(2 * i * P..(2 * i + 1) * P, Word(i))
                .unwrap(),
        );
        after.push(live());
    }
    count_this_thread(false);
    (after, subs)
}

/// The tree's storage grows now and then (a vector doubling, say): at the insert just
/// before a growth it is full, with no slack. Between two such moments the heap grew by
/// exactly what the subscriptions added in between cost, storage included; that is the
/// figure `memory_overhead` claims (which, by its docs, leaves growth slack out).
#[test]
fn memory_overhead_is_what_the_allocator_pays_per_subscription() {
    let mm = Subscriptions::new();
    let (live, subs) = live_bytes_after_each_insert(&mm, 5000);
    let deltas: Vec<isize> = live.windows(2).map(|w| w[1] - w[0]).collect();
    // The cost of an insert that does not grow the storage: the most frequent delta.
    let mut counts = std::collections::HashMap::new();
    for d in &deltas {
        *counts.entry(*d).or_insert(0usize) += 1;
    }
    let plain = *counts.iter().max_by_key(|(_, n)| **n).unwrap().0;
    // Inserts (indices into `live`) that grew the storage.
    let growths: Vec<usize> = (0..deltas.len())
        .filter(|&i| deltas[i] > plain)
        .map(|i| i + 1)
        .collect();
    assert!(
        growths.len() >= 2,
        "the storage never grew twice in 5000 inserts: {growths:?}"
    );
    let (g1, g2) = (growths[growths.len() - 2], growths[growths.len() - 1]);
    let full = |g: usize| live[g - 1];
    let per_sub =
        (full(g2) - full(g1)) as f64 / (g2 - g1) as f64 - std::mem::size_of::<Word>() as f64;
    let claimed = IntervalSubscription::<Word>::memory_overhead() as f64;
    println!(
        "interval subscription: {per_sub:.1} bytes measured between storage growths at inserts {g1} and {g2}, {claimed} claimed; an insert that does not grow the storage allocates {plain} bytes"
    );
    assert!(
        (per_sub - claimed).abs() < 4.0,
        "memory_overhead() says {claimed} bytes, the allocator paid {per_sub:.1} per subscription"
    );
    assert!(per_sub < 100.0, "{per_sub:.1} bytes per subscription");
    drop(subs);
}

/// A thread that reads many short-lived grace-period domains keeps a bounded list of its
/// reader slots: the slots of dropped domains are forgotten (it would otherwise hold one
/// slot per domain it ever read, forever), also while it reads many live ones.
#[test]
fn a_thread_forgets_the_reader_slots_of_dropped_domains() {
    let live_domains: Vec<Srcu> = (0..20).map(|_| Srcu::new()).collect();
    for d in &live_domains {
        drop(d.read_lock());
    }
    let read_in_new_domains = |n: usize| {
        for _ in 0..n {
            let domain = Srcu::new();
            drop(domain.read_lock());
        }
    };
    read_in_new_domains(100);
    count_this_thread(true);
    let before = live();
    read_in_new_domains(2000);
    let grown = live() - before;
    count_this_thread(false);
    println!("2000 more domains read and dropped: {grown} bytes still held by the thread");
    assert!(
        grown < 16 * 1024,
        "{grown} bytes kept for 2000 dropped domains"
    );
}
