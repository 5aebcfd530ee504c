//! `mmn demo`: the core subsystem at work, until the software primary MMU exists.
//!
//! A toy primary (an array of page -> frame translations) remaps random pages under
//! `invalidate_range_start` / end while several threads fault pages into a KVM-style
//! secondary that copies translations and fills them with the list-subscriber
//! collision-retry protocol (`in_progress` + sequence count under its own lock). Every
//! access through the secondary is checked against the primary: a translation the primary
//! no longer has, while no invalidation is in progress on the secondary, is a violation.
//! `--broken` makes the secondary skip its retry check, and the demo must then catch it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmu_notifier::{Event, ListSubscriber, Range, Subscriptions, WouldBlock};

const PAGE: u64 = 4096;

/// The toy primary MMU: one frame number per page.
struct Primary {
    frames: Vec<AtomicU64>,
    next_frame: AtomicU64,
    mm: Subscriptions,
}

#[derive(Default)]
struct ShadowState {
    map: HashMap<u64, u64>,
    in_progress: u32,
    range: Option<(u64, u64)>,
    seq: u64,
}

/// A KVM-style shadow page table.
struct Shadow {
    state: Mutex<ShadowState>,
    broken: bool,
}

impl ListSubscriber for Shadow {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        let mut s = self.state.lock().unwrap();
        s.in_progress += 1;
        s.range = Some(match s.range {
            Some((lo, hi)) => (lo.min(r.start()), hi.max(r.end())),
            None => (r.start(), r.end()),
        });
        s.map
            .retain(|&page, _| !r.overlaps(page * PAGE, (page + 1) * PAGE));
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Range) {
        let mut s = self.state.lock().unwrap();
        s.seq += 1;
        s.in_progress -= 1;
        if s.in_progress == 0 {
            s.range = None;
        }
    }
}

/// Counters reported at the end.
#[derive(Default)]
pub struct Report {
    pub remaps: AtomicU64,
    pub faults: AtomicU64,
    pub retries: AtomicU64,
    pub accesses: AtomicU64,
    pub violations: AtomicU64,
}

impl Shadow {
    /// Faults `page` into the shadow table: read the sequence, look the page up in the
    /// primary without the lock, then install under the lock unless an invalidation
    /// covering it is in progress or completed meanwhile.
    fn fault(&self, primary: &Primary, page: u64, report: &Report) {
        loop {
            let seq = self.state.lock().unwrap().seq;
            let frame = primary.frames[page as usize].load(SeqCst);
            let mut s = self.state.lock().unwrap();
            let addr = page * PAGE;
            let covered = s.in_progress > 0
                && s.range
                    .is_some_and(|(lo, hi)| addr < hi && lo < addr + PAGE);
            if !self.broken && (covered || s.seq != seq) {
                report.retries.fetch_add(1, Relaxed);
                drop(s);
                std::thread::yield_now();
                continue;
            }
            s.map.insert(page, frame);
            report.faults.fetch_add(1, Relaxed);
            return;
        }
    }

    /// Uses the translation of `page`, checking it against the primary.
    fn access(&self, primary: &Primary, page: u64, report: &Report) {
        let s = self.state.lock().unwrap();
        if let Some(&frame) = s.map.get(&page) {
            report.accesses.fetch_add(1, Relaxed);
            if s.in_progress == 0 && frame != primary.frames[page as usize].load(SeqCst) {
                report.violations.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Options of `mmn demo`.
pub struct DemoOptions {
    pub secs: f64,
    pub pages: u64,
    pub fillers: usize,
    pub seed: u64,
    pub broken: bool,
}

/// Runs the demo and returns its counters.
pub fn run(opts: &DemoOptions) -> Arc<Report> {
    let primary = Arc::new(Primary {
        frames: (0..opts.pages).map(AtomicU64::new).collect(),
        next_frame: AtomicU64::new(opts.pages),
        mm: Subscriptions::new(),
    });
    let shadow = Arc::new(Shadow {
        state: Mutex::new(ShadowState::default()),
        broken: opts.broken,
    });
    let reg = primary
        .mm
        .register(shadow.clone())
        .expect("a fresh address space accepts a start/end subscriber");
    let report = Arc::new(Report::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs_f64(opts.secs);

    let mut threads = Vec::new();
    for t in 0..=opts.fillers {
        let (primary, shadow, report, stop) = (
            primary.clone(),
            shadow.clone(),
            report.clone(),
            stop.clone(),
        );
        let mut rng = opts
            .seed
            .wrapping_add(t as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            | 1;
        let pages = opts.pages;
        threads.push(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let page = rng % pages;
                if t == 0 {
                    // The primary: remap one page.
                    let r = Range::new(page * PAGE, (page + 1) * PAGE, Event::Clear)
                        .expect("a page is a non-empty range");
                    let guard = primary.mm.invalidate_range_start(r);
                    let frame = primary.next_frame.fetch_add(1, Relaxed);
                    primary.frames[page as usize].store(frame, SeqCst);
                    drop(guard);
                    report.remaps.fetch_add(1, Relaxed);
                } else {
                    shadow.fault(&primary, page, &report);
                    shadow.access(&primary, page, &report);
                }
            }
        }));
    }
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Relaxed);
    for t in threads {
        t.join().expect("demo thread panicked");
    }
    reg.unregister();
    report
}
