//! loom models of the grace-period domain. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p mmu-notifier --release --test loom_srcu`.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use loom::sync::Arc;
use loom::thread;
use mmu_notifier::Srcu;

/// An RCU-protected object: `current` says which version readers should use; the old
/// version's memory is "freed" (written) by the updater after the grace period. loom
/// reports a data race if a reader that picked the old version can still read it then.
struct Protected {
    current: AtomicUsize,
    old: UnsafeCell<u32>,
}

// SAFETY: access to `old` is what the model checks; loom tracks every access to it.
unsafe impl Sync for Protected {}

fn protected() -> Arc<Protected> {
    Arc::new(Protected {
        current: AtomicUsize::new(0),
        old: UnsafeCell::new(7),
    })
}

fn reader(srcu: &Srcu, p: &Protected) {
    let _g = srcu.read_lock();
    if p.current.load(Acquire) == 0 {
        p.old
            .with(|v| assert_eq!(unsafe { *v }, 7, "read the old version after it was freed"));
    }
}

#[test]
fn synchronize_waits_for_every_reader_that_began_before_it() {
    loom::model(|| {
        let srcu = Srcu::new();
        let p = protected();
        let r = {
            let (srcu, p) = (srcu.clone(), p.clone());
            thread::spawn(move || reader(&srcu, &p))
        };
        p.current.store(1, Release);
        srcu.synchronize();
        p.old.with_mut(|v| unsafe { *v = 0 });
        r.join().unwrap();
    });
}

#[test]
fn a_reader_straddling_two_grace_periods_is_waited_for() {
    // Two back-to-back grace periods flip the index twice; a reader that loaded the index
    // before the first flip must still be waited for by the second.
    loom::model(|| {
        let srcu = Srcu::new();
        let p = protected();
        let r = {
            let (srcu, p) = (srcu.clone(), p.clone());
            thread::spawn(move || {
                reader(&srcu, &p);
                reader(&srcu, &p);
            })
        };
        srcu.synchronize();
        p.current.store(1, Release);
        srcu.synchronize();
        p.old.with_mut(|v| unsafe { *v = 0 });
        r.join().unwrap();
    });
}

#[test]
fn deferred_callbacks_run_exactly_once_and_only_after_a_grace_period() {
    loom::model(|| {
        let srcu = Srcu::new();
        let p = protected();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = {
            let (srcu, p) = (srcu.clone(), p.clone());
            thread::spawn(move || reader(&srcu, &p))
        };
        p.current.store(1, Release);
        {
            let (p, runs) = (p.clone(), runs.clone());
            srcu.call(move || {
                p.old.with_mut(|v| unsafe { *v = 0 });
                runs.fetch_add(1, SeqCst);
            });
        }
        srcu.barrier();
        assert_eq!(runs.load(SeqCst), 1);
        r.join().unwrap();
        srcu.barrier();
        assert_eq!(runs.load(SeqCst), 1, "ran exactly once");
    });
}

#[test]
fn readers_never_block_each_other() {
    // Each reader holds its section until it sees the other inside too: if entering a
    // section waited for another reader, this would deadlock and loom would report it.
    loom::model(|| {
        let srcu = Srcu::new();
        let inside = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let ts: Vec<_> = (0..2)
            .map(|i| {
                let (srcu, inside) = (srcu.clone(), inside.clone());
                thread::spawn(move || {
                    let _g = srcu.read_lock();
                    inside[i].store(true, SeqCst);
                    while !inside[1 - i].load(SeqCst) {
                        thread::yield_now();
                    }
                })
            })
            .collect();
        ts.into_iter().for_each(|t| t.join().unwrap());
    });
}
