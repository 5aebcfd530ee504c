//! The coherence checker catches the bugs it exists for, and stays silent for correct
//! secondaries.
//!
//! Three correct secondaries, each with a deliberately broken variant:
//! - `Mirror`: an interval subscription over the region (HMM style). Broken: it never
//!   tears down, or it ignores `read_retry`.
//! - `Kvm`: a list subscriber with KVM's `in_progress` / sequence protocol. Broken: its
//!   fill ignores `in_progress`, so it installs during an invalidation.
//! - `Tlb`: a TLB over the primary's own tables that only registers
//!   `arch_invalidate_secondary_tlbs`. Broken: its flush does nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};

mod common;

use common::{Rng, P};
use mmu_notifier::{
    IntervalContext, IntervalSubscriber, IntervalSubscription, ListRegistration, ListSubscriber,
    OwnerToken, Range, SecondaryTlb, WouldBlock,
};
use mmu_sim::{
    AddressSpace, Advice, CheckedSecondary, Checker, FrameAllocator, FrameRef, MapKind, Prot,
    SecondaryKind, ViolationKind,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broken {
    None,
    NeverTearsDown,
    IgnoresReadRetry,
    InstallsDuringInvalidation,
    NeverFlushes,
}

/// A secondary the tests drive: fill a translation, access through it.
trait Device: CheckedSecondary {
    /// Faults `a` in and installs it; false if the primary refused (unmapped, protected).
    fn fill(&self, mm: &AddressSpace, a: u64, write: bool) -> bool;
    /// Accesses `a` through the installed translation, if any (a write only through a
    /// writable one). Returns whether a translation was used.
    fn access(&self, mm: &AddressSpace, a: u64, write: Option<u64>) -> bool;
}

fn in_range(map: &BTreeMap<u64, (FrameRef, bool)>, s: u64, e: u64) -> Vec<(u64, FrameRef)> {
    map.range(s & !(P - 1)..e)
        .map(|(&a, &(f, _))| (a, f))
        .collect()
}

/// An access through `entry` (the secondary's translation of `a`, if any), made with the
/// secondary's lock held: a read through any translation, a write only through a writable
/// one. Returns whether a translation was used.
fn access_through(
    checker: &Checker,
    mm: &AddressSpace,
    s: &dyn CheckedSecondary,
    entry: Option<&(FrameRef, bool)>,
    a: u64,
    write: Option<u64>,
) -> bool {
    match (entry, write) {
        (Some(&(f, _)), None) => {
            checker.read(mm, s, a, f);
            true
        }
        (Some(&(f, true)), Some(v)) => {
            checker.write(mm, s, a, f, v);
            true
        }
        _ => false,
    }
}

// ----- Mirror: interval subscription ---------------------------------------------------

struct MirrorState {
    map: BTreeMap<u64, (FrameRef, bool)>,
    broken: Broken,
}

impl IntervalSubscriber for MirrorState {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        if self.broken != Broken::NeverTearsDown {
            let gone: Vec<u64> = in_range(&self.map, r.start(), r.end())
                .into_iter()
                .map(|(a, _)| a)
                .collect();
            for a in gone {
                self.map.remove(&a);
            }
        }
        Ok(())
    }
}

struct Mirror {
    sub: IntervalSubscription<MirrorState>,
    checker: Arc<Checker>,
    broken: Broken,
}

impl CheckedSecondary for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }
    fn translations_in(&self, s: u64, e: u64) -> Vec<(u64, FrameRef)> {
        in_range(&self.sub.lock().map, s, e)
    }
}

impl Mirror {
    fn new(mm: &Arc<AddressSpace>, start: u64, len: u64, broken: Broken) -> Arc<Self> {
        let sub = mm
            .notifier()
            .insert_interval(
                start..start + len,
                MirrorState {
                    map: BTreeMap::new(),
                    broken,
                },
            )
            .unwrap();
        let m = Arc::new(Mirror {
            sub,
            checker: mm.checker().unwrap().clone(),
            broken,
        });
        let weak: std::sync::Weak<dyn CheckedSecondary> = Arc::downgrade(&m) as _;
        m.checker.add_secondary(weak);
        m
    }

    /// The fill loop split in two, so a test can put a primary operation in between.
    fn prefetch(&self, mm: &AddressSpace, a: u64, write: bool) -> Option<(ReadSeqBox, FrameRef)> {
        let seq = self.sub.read_begin();
        let f = mm.fault(a, write).ok()?;
        Some((ReadSeqBox(seq), f))
    }

    fn install(
        &self,
        mm: &AddressSpace,
        a: u64,
        write: bool,
        seq: ReadSeqBox,
        f: FrameRef,
    ) -> bool {
        let mut g = self.sub.lock();
        if self.broken != Broken::IgnoresReadRetry && g.read_retry(seq.0) {
            return false;
        }
        self.checker.check_install(mm, self, a, f, write);
        g.map.insert(a, (f, write));
        true
    }
}

struct ReadSeqBox(mmu_notifier::ReadSeq);

impl Device for Mirror {
    fn fill(&self, mm: &AddressSpace, a: u64, write: bool) -> bool {
        for _ in 0..100 {
            let Some((seq, f)) = self.prefetch(mm, a, write) else {
                return false;
            };
            if self.install(mm, a, write, seq, f) {
                return true;
            }
        }
        false
    }
    fn access(&self, mm: &AddressSpace, a: u64, write: Option<u64>) -> bool {
        let g = self.sub.lock();
        access_through(&self.checker, mm, self, g.map.get(&a), a, write)
    }
}

// ----- Kvm: list subscriber with in_progress / seq ------------------------------------

#[derive(Default)]
struct KvmState {
    map: BTreeMap<u64, (FrameRef, bool)>,
    in_progress: u32,
    /// The union of the ranges being invalidated.
    range: Option<(u64, u64)>,
    seq: u64,
}

struct Kvm {
    state: Mutex<KvmState>,
    checker: Arc<Checker>,
    broken: Broken,
}

impl ListSubscriber for Kvm {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        let mut s = self.state.lock().unwrap();
        s.in_progress += 1;
        s.range = Some(match s.range {
            None => (r.start(), r.end()),
            Some((a, b)) => (a.min(r.start()), b.max(r.end())),
        });
        let gone: Vec<u64> = in_range(&s.map, r.start(), r.end())
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        for a in gone {
            s.map.remove(&a);
        }
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

impl CheckedSecondary for Kvm {
    fn name(&self) -> &str {
        "kvm"
    }
    fn translations_in(&self, s: u64, e: u64) -> Vec<(u64, FrameRef)> {
        in_range(&self.state.lock().unwrap().map, s, e)
    }
}

impl Kvm {
    fn new(mm: &Arc<AddressSpace>, broken: Broken) -> (Arc<Self>, ListRegistration) {
        let k = Arc::new(Kvm {
            state: Mutex::new(KvmState::default()),
            checker: mm.checker().unwrap().clone(),
            broken,
        });
        let reg = mm.notifier().register(k.clone()).unwrap();
        let weak: std::sync::Weak<dyn CheckedSecondary> = Arc::downgrade(&k) as _;
        k.checker.add_secondary(weak);
        (k, reg)
    }

    fn prefetch(&self, mm: &AddressSpace, a: u64, write: bool) -> Option<(u64, FrameRef)> {
        let seq = self.state.lock().unwrap().seq;
        let f = mm.fault(a, write).ok()?;
        Some((seq, f))
    }

    /// KVM's `mmu_invalidate_retry`: refuse while an invalidation covers the page or
    /// after one ended since the prefetch.
    fn install(&self, mm: &AddressSpace, a: u64, write: bool, seq: u64, f: FrameRef) -> bool {
        let mut s = self.state.lock().unwrap();
        let covered = s.in_progress > 0 && s.range.is_some_and(|(x, y)| x <= a && a < y);
        if (covered && self.broken != Broken::InstallsDuringInvalidation) || s.seq != seq {
            return false;
        }
        self.checker.check_install(mm, self, a, f, write);
        s.map.insert(a, (f, write));
        true
    }
}

impl Device for Kvm {
    fn fill(&self, mm: &AddressSpace, a: u64, write: bool) -> bool {
        for _ in 0..100 {
            let Some((seq, f)) = self.prefetch(mm, a, write) else {
                return false;
            };
            if self.install(mm, a, write, seq, f) {
                return true;
            }
        }
        false
    }
    fn access(&self, mm: &AddressSpace, a: u64, write: Option<u64>) -> bool {
        let s = self.state.lock().unwrap();
        access_through(&self.checker, mm, self, s.map.get(&a), a, write)
    }
}

// ----- Tlb: shares the primary's tables -------------------------------------------------

struct Tlb {
    entries: Mutex<BTreeMap<u64, (FrameRef, bool)>>,
    /// Bumped by every flush: a fill that walked the tables before a flush must not
    /// insert what it found.
    flushes: AtomicU64,
    checker: Arc<Checker>,
    broken: Broken,
}

impl SecondaryTlb for Tlb {
    fn arch_invalidate_secondary_tlbs(&self, s: u64, e: u64) {
        let mut t = self.entries.lock().unwrap();
        // Release (under the lock): a fill that sees the old count inserts before us.
        self.flushes.fetch_add(1, Release);
        if self.broken != Broken::NeverFlushes {
            let gone: Vec<u64> = in_range(&t, s, e).into_iter().map(|(a, _)| a).collect();
            for a in gone {
                t.remove(&a);
            }
        }
    }
}

impl CheckedSecondary for Tlb {
    fn name(&self) -> &str {
        "tlb"
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::SharedTables
    }
    fn translations_in(&self, s: u64, e: u64) -> Vec<(u64, FrameRef)> {
        in_range(&self.entries.lock().unwrap(), s, e)
    }
}

impl Tlb {
    fn new(mm: &Arc<AddressSpace>, broken: Broken) -> (Arc<Self>, ListRegistration) {
        let t = Arc::new(Tlb {
            entries: Mutex::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
            checker: mm.checker().unwrap().clone(),
            broken,
        });
        let reg = mm.notifier().register_tlb(t.clone()).unwrap();
        let weak: std::sync::Weak<dyn CheckedSecondary> = Arc::downgrade(&t) as _;
        t.checker.add_secondary(weak);
        (t, reg)
    }
}

impl Device for Tlb {
    fn fill(&self, mm: &AddressSpace, a: u64, write: bool) -> bool {
        for _ in 0..100 {
            let n = self.flushes.load(Acquire);
            // A hardware walk: read the entry; fault (a page request) if it is not usable.
            let pte = mm.pte(a);
            let Some(pfn) = pte.pfn().filter(|_| !write || pte.writable()) else {
                if mm.fault(a, write).is_err() {
                    return false;
                }
                continue;
            };
            let f = mm.frames().frame_ref(pfn);
            let mut t = self.entries.lock().unwrap();
            if self.flushes.load(Acquire) != n {
                continue;
            }
            t.insert(a, (f, pte.writable()));
            return true;
        }
        false
    }
    fn access(&self, mm: &AddressSpace, a: u64, write: Option<u64>) -> bool {
        let t = self.entries.lock().unwrap();
        access_through(&self.checker, mm, self, t.get(&a), a, write)
    }
}

// ----- fixtures ---------------------------------------------------------------------

fn space(seed: u64) -> (Arc<AddressSpace>, Arc<Checker>) {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(8192)));
    let checker = Checker::new(seed);
    mm.attach_checker(checker.clone()).unwrap();
    (mm, checker)
}

fn kinds(c: &Checker) -> Vec<(ViolationKind, &'static str, String)> {
    c.violations()
        .into_iter()
        .map(|v| (v.kind, v.op.as_str(), v.secondary))
        .collect()
}

// ----- scripted: each broken variant is caught, each correct one is not ----------------

#[test]
fn correct_secondaries_through_every_operation_report_nothing() {
    let (mm, checker) = space(1);
    let a = mm.mmap_anon(16 * P, Prot::READ_WRITE).unwrap();
    let mirror = Mirror::new(&mm, a, 16 * P, Broken::None);
    let (kvm, _r1) = Kvm::new(&mm, Broken::None);
    let (tlb, _r2) = Tlb::new(&mm, Broken::None);
    let devices: [&dyn Device; 3] = [&*mirror, &*kvm, &*tlb];
    let refill = |mm: &AddressSpace| {
        for (n, d) in devices.iter().enumerate() {
            for i in 0..16 {
                let pa = a + i * P;
                if d.fill(mm, pa, true) {
                    d.access(mm, pa, Some(i * 10 + n as u64));
                    d.access(mm, pa, None);
                }
            }
        }
    };
    refill(&mm);
    mm.munmap(a + 2 * P, P).unwrap();
    mm.mmap(P, Prot::READ_WRITE, MapKind::AnonPrivate, Some(a + 2 * P))
        .unwrap();
    refill(&mm);
    let child = mm.fork();
    child.write(a, 99).unwrap();
    refill(&mm);
    mm.migrate(a + 3 * P).unwrap();
    refill(&mm);
    mm.reclaim(a, a + 16 * P).unwrap();
    mm.reclaim(a, a + 16 * P).unwrap();
    refill(&mm);
    mm.madvise(a, 4 * P, Advice::DontNeed).unwrap();
    mm.mprotect(a, 16 * P, Prot::READ).unwrap();
    mm.mprotect(a, 16 * P, Prot::READ_WRITE).unwrap();
    refill(&mm);
    mm.clear_soft_dirty();
    mm.make_exclusive(a + 5 * P, OwnerToken(1)).unwrap();
    refill(&mm);
    child.exit();
    mm.munmap(a, 16 * P).unwrap();
    assert_eq!(checker.violations(), []);
    assert!(
        checker.checks() > 200,
        "the checker really ran: {}",
        checker.checks()
    );
}

#[test]
fn a_mirror_that_never_tears_down_is_caught_at_start_and_at_the_next_access() {
    let (mm, checker) = space(7);
    let a = mm.mmap_anon(4 * P, Prot::READ_WRITE).unwrap();
    let mirror = Mirror::new(&mm, a, 4 * P, Broken::NeverTearsDown);
    assert!(mirror.fill(&mm, a + P, true));
    mm.munmap(a, 4 * P).unwrap();
    assert_eq!(
        kinds(&checker),
        [(
            ViolationKind::StaleTranslation,
            "munmap",
            "mirror".to_string()
        )]
    );
    let v = &checker.violations()[0];
    assert_eq!((v.addr, v.seed), (a + P, 7));
    assert!(v.to_string().contains("seed 7"), "{v}");
    // The frame was freed: the next access is a use-after-free, and is not performed.
    assert!(mirror.access(&mm, a + P, Some(5)));
    assert_eq!(
        kinds(&checker)[1],
        (ViolationKind::UseAfterFree, "write", "mirror".to_string())
    );
}

#[test]
fn a_mirror_that_ignores_read_retry_installs_a_stale_frame_and_is_caught() {
    for broken in [Broken::None, Broken::IgnoresReadRetry] {
        let (mm, checker) = space(3);
        let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
        mm.write(a, 1).unwrap();
        let mirror = Mirror::new(&mm, a, P, broken);
        let (seq, frame) = mirror.prefetch(&mm, a, true).unwrap();
        // The primary moves the page between the mirror's fault and its install.
        mm.migrate(a).unwrap();
        let installed = mirror.install(&mm, a, true, seq, frame);
        if broken == Broken::None {
            assert!(!installed, "read_retry refuses the stale frame");
            assert_eq!(checker.violations(), []);
            continue;
        }
        assert!(installed);
        assert_eq!(
            kinds(&checker),
            [(
                ViolationKind::StaleTranslation,
                "install",
                "mirror".to_string()
            )]
        );
        // Writing through it would be lost: the old frame was freed by the migration.
        mirror.access(&mm, a, Some(2));
        assert_eq!(checker.violations()[1].kind, ViolationKind::UseAfterFree);
        assert_eq!(
            mm.read(a).unwrap(),
            1,
            "the primary's page was not corrupted"
        );
    }
}

/// Runs a closure from inside an invalidation window: its TLB-flush callback comes after
/// `invalidate_range_start` returned and before `end`.
struct InsideWindow(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl SecondaryTlb for InsideWindow {
    fn arch_invalidate_secondary_tlbs(&self, _: u64, _: u64) {
        if let Some(f) = self.0.lock().unwrap().take() {
            f();
        }
    }
}

#[test]
fn a_kvm_that_installs_during_an_invalidation_is_caught() {
    for broken in [Broken::None, Broken::InstallsDuringInvalidation] {
        let (mm, checker) = space(11);
        let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
        mm.write(a, 1).unwrap();
        let (kvm, _reg) = Kvm::new(&mm, broken);
        let (seq, frame) = kvm.prefetch(&mm, a, true).unwrap();
        let inside = Arc::new(InsideWindow(Mutex::new(None)));
        let _reg2 = mm.notifier().register_tlb(inside.clone()).unwrap();
        let (k, m) = (kvm.clone(), mm.clone());
        let installed = Arc::new(AtomicU64::new(0));
        let inst = installed.clone();
        *inside.0.lock().unwrap() = Some(Box::new(move || {
            inst.store(u64::from(k.install(&m, a, true, seq, frame)), SeqCst);
        }));
        mm.madvise(a, 2 * P, Advice::DontNeed).unwrap();
        if broken == Broken::None {
            assert_eq!(installed.load(SeqCst), 0, "in_progress refuses the install");
            assert_eq!(checker.violations(), []);
            continue;
        }
        assert_eq!(installed.load(SeqCst), 1);
        let v = checker.violations();
        assert_eq!(v[0].kind, ViolationKind::StaleTranslation);
        assert_eq!(v[0].op, "madvise dontneed");
        assert_eq!(v[0].addr, a);
        assert!(v[0].detail.contains("inside the invalidation"), "{}", v[0]);
    }
}

#[test]
fn a_tlb_that_never_flushes_is_caught_after_the_flush() {
    let (mm, checker) = space(5);
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    let (tlb, _reg) = Tlb::new(&mm, Broken::NeverFlushes);
    assert!(tlb.fill(&mm, a, true));
    mm.munmap(a, 2 * P).unwrap();
    assert_eq!(
        kinds(&checker),
        [(ViolationKind::StaleTranslation, "munmap", "tlb".to_string())]
    );
}

#[test]
fn a_write_through_a_translation_kept_across_fork_is_a_lost_write_and_corrupts_the_child() {
    let (mm, checker) = space(9);
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    mm.write(a, 1).unwrap();
    let mirror = Mirror::new(&mm, a, P, Broken::NeverTearsDown);
    assert!(mirror.fill(&mm, a, true));
    let child = mm.fork();
    assert_eq!(
        kinds(&checker),
        [(
            ViolationKind::StaleTranslation,
            "fork",
            "mirror".to_string()
        )]
    );
    assert!(mirror.access(&mm, a, Some(2)));
    assert_eq!(
        kinds(&checker)[1],
        (ViolationKind::LostWrite, "write", "mirror".to_string())
    );
    // What the violation means: the write landed in the page the child shares.
    assert_eq!(
        child.read(a).unwrap(),
        2,
        "the child sees the parent's device write"
    );
    mm.write(a, 3).unwrap(); // parent breaks COW: the device's write is lost for it
    assert_eq!(child.read(a).unwrap(), 2);
}

// ----- concurrent: random primary operations against secondaries on other threads -----

const PAGES: u64 = 32;

fn primary_op(mm: &AddressSpace, base: u64, rng: &mut Rng) {
    let p = base + rng.below(PAGES) * P;
    let n = 1 + rng.below(4);
    let len = n.min((base + PAGES * P - p) / P) * P;
    let _ = match rng.below(11) {
        0 => mm
            .munmap(p, len)
            .and_then(|_| mm.mmap(len, Prot::READ_WRITE, MapKind::AnonPrivate, Some(p)))
            .map(drop),
        1 => mm.madvise(p, len, Advice::DontNeed),
        2 => mm
            .mprotect(p, len, Prot::READ)
            .and_then(|_| mm.mprotect(p, len, Prot::READ_WRITE)),
        3 => mm.reclaim(p, p + len).map(drop),
        4 => mm.migrate(p).map(drop),
        5 => {
            let child = mm.fork();
            let _ = child.write(p, 7);
            let _ = mm.write(p, rng.next());
            child.exit();
            Ok(())
        }
        6 => {
            mm.clear_soft_dirty();
            Ok(())
        }
        7 => mm.make_exclusive(p, OwnerToken(1)).map(drop),
        8 => mm.madvise(p, len, Advice::Free),
        9 => mm.age(p, p + len).map(drop),
        _ => mm.write(p, rng.next()),
    };
}

/// Runs primary operations on one thread and fills/accesses of `devices` on another
/// until `ops` primary operations are done or (if `stop_on_violation`) one is found.
fn race(seed: u64, broken: Broken, ops: u64) -> Arc<Checker> {
    let (mm, checker) = space(seed);
    let base = mm.mmap_anon(PAGES * P, Prot::READ_WRITE).unwrap();
    let mirror = Mirror::new(&mm, base, PAGES * P, broken);
    let (kvm, _r1) = Kvm::new(&mm, broken);
    let (tlb, _r2) = Tlb::new(&mm, broken);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng(seed | 1);
            for _ in 0..ops {
                primary_op(&mm, base, &mut rng);
                if broken != Broken::None && checker.violation_count() > 0 {
                    break;
                }
            }
            done.store(true, SeqCst);
        });
        s.spawn(|| {
            let mut rng = Rng((seed << 1) | 1);
            let devices: [&dyn Device; 3] = [&*mirror, &*kvm, &*tlb];
            while !done.load(SeqCst) {
                let d = devices[rng.below(3) as usize];
                let p = base + rng.below(PAGES) * P;
                match rng.below(3) {
                    0 => {
                        d.fill(&mm, p, rng.below(2) == 0);
                    }
                    1 => {
                        d.access(&mm, p, Some(rng.next()));
                    }
                    _ => {
                        d.access(&mm, p, None);
                    }
                }
            }
        });
    });
    checker
}

/// Correct secondaries racing a primary report nothing: seeds 1-3 of 1500 operations in
/// every run; a soak by hand with `MMU_SIM_SOAK_SEEDS=200 cargo test --release -p mmu-sim
/// --test checker racing_correct` (seeds 1-N of 5000 operations).
#[test]
fn racing_correct_secondaries_report_nothing() {
    let (seeds, ops) = match std::env::var("MMU_SIM_SOAK_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) => (n, 5000),
        None => (3, 1500),
    };
    for seed in 1..=seeds {
        let c = race(seed, Broken::None, ops);
        assert_eq!(c.violations(), [], "seed {seed}");
        assert!(c.checks() > 1000, "seed {seed}: {} checks", c.checks());
    }
}

#[test]
fn racing_broken_secondaries_are_each_caught() {
    for broken in [
        Broken::NeverTearsDown,
        Broken::IgnoresReadRetry,
        Broken::InstallsDuringInvalidation,
        Broken::NeverFlushes,
    ] {
        let found = (1..=20).any(|seed| race(seed, broken, 3000).violation_count() > 0);
        assert!(found, "{broken:?} was never caught");
    }
}
