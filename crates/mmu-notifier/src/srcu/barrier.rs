//! The two halves of the barrier pair between SRCU readers and updaters.
//!
//! A reader's lock increment must be ordered before its section's loads, against an
//! updater's prior stores being ordered before its counter reads (the store-buffering
//! pattern: without barriers on both sides, each could miss the other's write).
//!
//! - *Asymmetric* (Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, the liburcu
//!   "memb" flavour): the reader only stops the compiler; the updater asks the kernel to
//!   run a full memory barrier on every CPU currently running a thread of this process
//!   (threads not running passed one at their context switch). Reader sections become
//!   almost free; each grace period pays one system call.
//! - *Symmetric*: SeqCst fences on both sides. Used where membarrier is missing or refused
//!   (old kernels, seccomp), when `MMU_NOTIFIER_SYMMETRIC_BARRIERS=1` is set, always on
//!   targets other than Linux and Android (no membarrier: the fence-only implementation
//!   below is compiled instead, so the crate builds on any `std` target), and always
//!   under loom (which cannot model the asymmetric form; the symmetric one is strictly
//!   stronger for readers). `--cfg mmu_notifier_fence_only` compiles the fence-only
//!   implementation on Linux too, so that the tests exercise it.
//!
//! The flavour is decided once per process, by the first `Srcu::new`, before any reader of
//! any domain can exist, and never changes.

use std::sync::atomic::{compiler_fence, Ordering::SeqCst};

#[cfg(all(
    not(loom),
    not(mmu_notifier_fence_only),
    any(target_os = "linux", target_os = "android")
))]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Once;

    static ASYMMETRIC: AtomicBool = AtomicBool::new(false);
    static INIT: Once = Once::new();

    const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn membarrier(cmd: libc::c_long) -> libc::c_long {
        // SAFETY: membarrier takes two integer arguments (command and flags, plus an
        // unused cpu id) and touches no memory of ours; an unknown command fails with
        // EINVAL, a forbidden one with EPERM or ENOSYS.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        }
    }

    pub(in crate::srcu) fn init() {
        INIT.call_once(|| {
            let forced_off = std::env::var_os("MMU_NOTIFIER_SYMMETRIC_BARRIERS")
                .is_some_and(|v| v != "0" && !v.is_empty());
            let supported = !forced_off
                && cfg!(target_os = "linux")
                && membarrier(MEMBARRIER_CMD_QUERY) >= 0
                && membarrier(MEMBARRIER_CMD_QUERY) & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
                && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
            // Published by `Once`: every later `init` caller happens-after this store.
            ASYMMETRIC.store(supported, Relaxed);
        });
    }

    #[inline(always)]
    pub(in crate::srcu) fn asymmetric() -> bool {
        ASYMMETRIC.load(Relaxed)
    }

    pub(in crate::srcu) fn heavy() {
        let r = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
        // Registration succeeded, so this cannot fail; if the kernel says otherwise the
        // readers' compiler-only barriers are unsound, and carrying on would be worse.
        assert!(
            r == 0,
            "membarrier(PRIVATE_EXPEDITED) failed after registration: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Targets without membarrier (and `--cfg mmu_notifier_fence_only`): the symmetric
/// barriers, always. No system call, no `libc`.
#[cfg(all(
    not(loom),
    any(
        mmu_notifier_fence_only,
        not(any(target_os = "linux", target_os = "android"))
    )
))]
mod imp {
    pub(in crate::srcu) fn init() {}
    #[inline(always)]
    pub(in crate::srcu) fn asymmetric() -> bool {
        false
    }
    pub(in crate::srcu) fn heavy() {
        unreachable!("the fence-only barriers never take the asymmetric path")
    }
}

#[cfg(loom)]
mod imp {
    pub(in crate::srcu) fn init() {}
    #[inline(always)]
    pub(in crate::srcu) fn asymmetric() -> bool {
        false
    }
    pub(in crate::srcu) fn heavy() {
        unreachable!("loom always uses symmetric barriers")
    }
}

pub(super) use imp::{asymmetric, init};

/// The reader's half: after the lock increment, before the section. `asymmetric` is the
/// domain's copy of [`asymmetric()`].
#[inline(always)]
pub(super) fn reader(asymmetric: bool) {
    if asymmetric {
        compiler_fence(SeqCst);
    } else {
        crate::sync::fence(SeqCst);
    }
}

/// The updater's half: after its updates, before it reads the readers' counters.
pub(super) fn updater() {
    if asymmetric() {
        imp::heavy();
    }
    crate::sync::fence(SeqCst);
}

/// The implementation this build has, run by the unit tests: `scripts/test.sh` also builds
/// them with `--cfg mmu_notifier_fence_only`, the implementation of targets without
/// membarrier.
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::Srcu;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst as Sc};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// Whether this build compiled the fence-only implementation.
    const FENCE_ONLY: bool =
        cfg!(mmu_notifier_fence_only) || !cfg!(any(target_os = "linux", target_os = "android"));

    #[test]
    fn the_flavour_is_the_one_this_build_has() {
        init();
        println!(
            "fence-only build: {FENCE_ONLY}; asymmetric barriers: {}",
            asymmetric()
        );
        if FENCE_ONLY {
            assert!(!asymmetric(), "a fence-only build took the membarrier path");
        }
        // A domain's readers use the process's flavour (their copy of it).
        assert_eq!(Srcu::new().inner.asymmetric, asymmetric());
        // Both halves run without failing whichever flavour is in use.
        reader(asymmetric());
        updater();
    }

    /// Function-call interrupts received per CPU so far (x86's `CAL` line of
    /// `/proc/interrupts`), if this system reports them.
    fn function_call_interrupts() -> Option<Vec<u64>> {
        let all = std::fs::read_to_string("/proc/interrupts").ok()?;
        let line = all.lines().find(|l| l.trim_start().starts_with("CAL:"))?;
        Some(
            line.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse().ok())
                .collect(),
        )
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn pin_to(cpu: usize) -> bool {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only
        // write and read that local set.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0
        }
    }

    /// The asymmetric updater barrier is what makes the readers' compiler-only barrier
    /// sound: the kernel must interrupt every CPU that runs a thread of this process, so
    /// that it executes a full barrier. Counted where the kernel counts it: a thread
    /// spins on one CPU while another thread runs updater barriers on another, and the
    /// spinning CPU's function-call interrupts must grow with them. (The ordering bug an
    /// updater without it would have needs a store held in a store buffer across a whole
    /// grace period: no test on real threads hits that reliably, so the barrier itself is
    /// observed.)
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn the_asymmetric_updater_barrier_interrupts_the_cpus_running_our_threads() {
        // On a thread of its own: it pins itself, which must not outlive the test.
        std::thread::spawn(updater_barrier_interrupts)
            .join()
            .unwrap();
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn updater_barrier_interrupts() {
        init();
        if !asymmetric() {
            println!("SKIPPED: this process uses the symmetric barriers");
            return;
        }
        let Some(before) = function_call_interrupts() else {
            println!("SKIPPED: this system does not report function-call interrupts");
            return;
        };
        if before.len() < 2 || !pin_to(0) {
            println!("SKIPPED: needs two CPUs and a thread pinned to CPU 0");
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let pinned = pin_to(1);
                ready_tx.send(pinned).unwrap();
                while !stop.load(Sc) {
                    std::hint::spin_loop();
                }
            })
        };
        if !ready_rx.recv().unwrap() {
            stop.store(true, Sc);
            spinner.join().unwrap();
            println!("SKIPPED: cannot pin a thread to CPU 1");
            return;
        }
        // Barriers until the spinning CPU took WANT interrupts, or for at most 2 s.
        const WANT: u64 = 400;
        let base = function_call_interrupts().unwrap()[1];
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let (mut barriers, mut got) = (0u64, 0u64);
        while got < WANT && std::time::Instant::now() < deadline {
            for _ in 0..100 {
                updater();
            }
            barriers += 100;
            got = function_call_interrupts().unwrap()[1] - base;
        }
        stop.store(true, Sc);
        spinner.join().unwrap();
        println!("{barriers} updater barriers: {got} function-call interrupts on CPU 1");
        // Unrelated interrupts only add to the count (a few per second here); a spinner
        // preempted by another process misses some (one in ten got through on a 2-CPU
        // machine with four compilers running). Without the system call: none.
        assert!(
            got >= WANT / 2,
            "{barriers} updater barriers in 2 s interrupted the CPU running our other \
             thread only {got} times: the asymmetric barrier does not reach the readers"
        );
    }

    #[test]
    fn a_grace_period_waits_for_a_reader_inside_its_section() {
        let srcu = Srcu::new();
        let left = Arc::new(AtomicBool::new(false));
        let (inside_tx, inside_rx) = mpsc::channel();
        let reader = {
            let (srcu, left) = (srcu.clone(), left.clone());
            std::thread::spawn(move || {
                let guard = srcu.read_lock();
                inside_tx.send(()).unwrap();
                // Long enough that a synchronize that did not wait would return first.
                std::thread::sleep(Duration::from_millis(50));
                left.store(true, Sc);
                drop(guard);
            })
        };
        inside_rx.recv().unwrap();
        srcu.synchronize();
        assert!(
            left.load(Sc),
            "synchronize returned while a reader that began before it was inside"
        );
        reader.join().unwrap();
    }
}
