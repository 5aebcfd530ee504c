//! Behaviour of the public accessors and helpers that mutation testing
//! (`scripts/mutants.sh rest`) found unchecked; `docs/mutants.md` lists the mutants each
//! test kills. The protocol's own edges are in `mutants_protocol.rs`.
#![cfg(not(loom))]

use std::sync::{Arc, Mutex};

use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock};

const P: u64 = 4096;

fn unmap(start: u64, end: u64) -> Range {
    Range::new(start, end, Event::Unmap).unwrap()
}

/// What a callback sees in its context: the odd sequence of this invalidation (also in
/// the context's `Debug`), the address space, and a move of its own subscription that
/// applies at the end.
#[test]
fn a_callbacks_context_shows_the_odd_seq_and_moves_its_subscription() {
    struct Mover(Arc<Mutex<Vec<String>>>);
    impl IntervalSubscriber for Mover {
        fn invalidate(
            &mut self,
            _: &Range,
            ctx: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            let mut seen = self.0.lock().unwrap();
            seen.push(format!("{ctx:?}"));
            seen.push(format!("cur_seq {}", ctx.cur_seq()));
            let n = ctx.subscriptions().stats().interval_subscriptions;
            seen.push(format!("subscriptions {n}"));
            ctx.update_self(8 * P..9 * P).unwrap();
            Ok(())
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mm = Subscriptions::new();
    let a = mm.insert_interval(0..P, Mover(seen.clone())).unwrap();
    let before = mm.stats().interval_seq;
    drop(mm.invalidate_range_start(unmap(0, P)));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            format!("IntervalContext {{ cur_seq: {} }}", before + 1),
            format!("cur_seq {}", before + 1),
            "subscriptions 1".to_string()
        ]
    );
    assert_eq!(before % 2, 0, "even when idle");
    assert_eq!(a.range(), Some(8 * P..9 * P), "moved by update_self");
}

/// Deferred callbacks run one at a time, in the order they were queued, on one worker at a
/// time: a `call` while the worker runs does not start a second one, and a `barrier` waits
/// for the running worker instead of running the queue itself.
#[test]
fn deferred_callbacks_run_in_order_on_one_worker_at_a_time() {
    use mmu_notifier::srcu::Srcu;
    use std::sync::mpsc;
    use std::time::Duration;

    let domain = Srcu::new();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let (release_first, first_may_finish) = mpsc::channel::<()>();
    let (first_started, started) = mpsc::channel::<()>();
    {
        let ran = ran.clone();
        domain.call(move || {
            first_started.send(()).unwrap();
            first_may_finish.recv().unwrap();
            ran.lock().unwrap().push(0);
        });
    }
    started
        .recv_timeout(Duration::from_secs(20))
        .expect("the worker never ran the first callback");
    for i in 1..10 {
        let ran = ran.clone();
        domain.call(move || ran.lock().unwrap().push(i));
    }
    let waiter = {
        let domain = domain.clone();
        std::thread::spawn(move || domain.barrier())
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        ran.lock().unwrap().is_empty(),
        "a callback ran while the first one was still running: {:?}",
        ran.lock().unwrap()
    );
    release_first.send(()).unwrap();
    waiter.join().unwrap();
    assert_eq!(*ran.lock().unwrap(), (0..10).collect::<Vec<_>>());
}
