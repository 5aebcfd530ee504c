//! `mmn replay` of a real program's memory system calls, as `strace` printed them.
//!
//! Record a trace with
//!
//! ```text
//! strace -f -y -e trace=%memory,%process -o TRACE PROGRAM ARGS...
//! mmn replay TRACE
//! ```
//!
//! (`-y` names the file behind each descriptor, so mappings of one file share one
//! simulated page cache; without it descriptors stand for files.) Every task of the trace
//! is followed; every address space it had is simulated, with the coherence checker and
//! every secondary attached, and every device access checked.
//!
//! # Replaying a call
//! Calls are replayed one at a time in the trace's order (the order in which they
//! returned; a call split by strace takes effect at its `resumed` half). One exception:
//! a call takes effect somewhere between its two halves, so when threads overlap, a
//! `munmap` or moving `mremap` may free a range another thread's `mmap` gets before the
//! first call's result is printed; such an `mmap` (or moved `mremap`) waits, with its
//! task's later calls, until the freeing call completes (counted as `reordered`).
//!
//! - `mmap` is replayed at the address the kernel returned (`MAP_FIXED` there), so the
//!   simulated layout is the program's, whatever the simulation's own placement would
//!   be: anonymous private or shared, or a file (one simulated file per path) at its
//!   offset, private or shared. `munmap`, `mprotect` (and `pkey_mprotect`), `madvise`
//!   (`MADV_DONTNEED`, `MADV_FREE`; other advice does not change translations and is
//!   counted only) and `mremap` (in place when the kernel kept the address, else moved to
//!   exactly where it went) follow. `brk` maps or unmaps the heap's growth or shrinkage.
//! - `clone`/`clone3`/`vfork` with `CLONE_VM` add a task to the same address space;
//!   without it, and `fork`, fork it (with copy-on-write). A successful `execve` gives the
//!   task a fresh address space; a task's end (`+++ exited`, `+++ killed`) or `execve`
//!   leaves its address space, which exits when its last task has left.
//! - Memory the kernel maps at `execve` (the program, its interpreter, the stack) is never
//!   named by a system call; the first successful `mprotect` or `madvise` of such memory
//!   (typically `mprotect` of the relocated data) maps it first, as a private mapping of
//!   the program's image, written (as relocation writes it).
//! - A call that failed in the trace (`= -1 ERRNO`, or interrupted) is not replayed: it is
//!   counted by call and errno. (Linux may have applied part of a failed `mprotect` or
//!   `madvise` before finding a hole; those partial effects are not replayed.) Calls the
//!   replay does not model (`shmat`, `remap_file_pages`, `MREMAP_DONTUNMAP`, ...) are
//!   counted by name; calls without effect on translations (`wait4`, `msync`, ...) too.
//!
//! # Touching pages
//! After each call the pages it implies are used: new private or writable memory, the
//! heap's growth and relocated data are written; read-only and executable file mappings
//! are read. At most `touch_pages` pages per call, spread over the range (its first and
//! last, evenly between). Each touched page is accessed by the CPU, then by every
//! secondary (a device fault through the secondary's own translation, retried against
//! invalidations, then an access through it, checked). After `munmap`, `madvise`, a
//! move or shrink (`mremap`, `brk`) and `mprotect` to `PROT_NONE`, every secondary
//! accesses the first page of the range taken away again (a probe): a correct one
//! refaults (and is refused where nothing is mapped); one that kept a stale translation is
//! caught by the checker. The replay runs in one thread, so secondaries that are only
//! wrong when a fault races with an invalidation (a retry check skipped) are the
//! torture's to catch, not the replay's.
//!
//! # Addresses
//! The program's addresses are translated onto the simulated arena by slots of 64 GiB:
//! each slot of the program's space gets an arena slot on first use (next to the slot
//! of its neighbour if that one is placed and the place is free), so any layout of a
//! 48- or 57-bit space fits as long as its slots fit the arena's 2047, and a mapping that
//! spans slots stays contiguous. A range that cannot be placed contiguously is counted,
//! not replayed. Violations name the program's address beside the arena's.

mod parse;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmu_notifier::{ListRegistration, ListSubscriber, Range, WouldBlock};
use mmu_secondary::broken::{Broken, BrokenSecondary};
use mmu_secondary::{SecondaryMmu, SecondaryStats};
use mmu_sim::{
    AddressSpace, Advice, Checker, File, FrameAllocator, MapKind, MremapFlags, Prot, Violation,
    PAGE_SIZE, TASK_SIZE,
};

use parse::{Parser, Record, Ret};

/// The program's address space is placed by slots of this size.
const SLOT_SHIFT: u32 = 36;
const SLOT: u64 = 1 << SLOT_SHIFT;
/// The arena: every slot but the lowest.
const ARENA_BASE: u64 = SLOT;
const ARENA_LEN: u64 = TASK_SIZE - ARENA_BASE;
const ARENA_SLOTS: u64 = ARENA_LEN / SLOT;

/// Most violations kept in the report.
const KEPT: usize = 1000;

/// How to replay.
#[derive(Clone, Debug)]
pub struct StraceOptions {
    /// Secondaries to attach to every address space, by name.
    pub secondaries: Vec<String>,
    /// A deliberately broken secondary to attach too (the replay must then fail).
    pub broken: Option<Broken>,
    /// Most pages touched per call.
    pub touch_pages: u64,
    /// Frames in the simulated memory.
    pub frames: u32,
    /// Seed reported with violations.
    pub seed: u64,
}

impl Default for StraceOptions {
    fn default() -> Self {
        StraceOptions {
            secondaries: crate::attach::ALL.split(',').map(String::from).collect(),
            broken: None,
            touch_pages: 8,
            frames: 1 << 19,
            seed: 0,
        }
    }
}

/// Why a replay could not run.
#[derive(Debug)]
pub enum StraceError {
    /// The trace could not be read.
    Read(std::io::Error),
    /// A secondary could not be attached, or none was asked for.
    Setup(String),
}

impl std::fmt::Display for StraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StraceError::Read(e) => write!(f, "cannot read the trace: {e}"),
            StraceError::Setup(e) => write!(f, "{e}"),
        }
    }
}

/// The trace itself.
#[derive(Clone, Debug, Default)]
pub struct TraceStats {
    /// Size in bytes.
    pub bytes: u64,
    /// Lines.
    pub lines: u64,
    /// Complete system calls (split ones counted once).
    pub calls: u64,
    /// Calls by name.
    pub by_name: BTreeMap<String, u64>,
    /// Lines that were neither a call, a task's end nor a signal.
    pub unparsed_lines: u64,
    /// Split calls whose second half never came.
    pub never_resumed: u64,
    /// Tasks (processes and threads) seen.
    pub tasks: u64,
    /// Simulated address spaces.
    pub address_spaces: u64,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct StraceReport {
    /// The trace.
    pub trace: TraceStats,
    /// Replayed operations by kind.
    pub ops: BTreeMap<&'static str, u64>,
    /// Calls that failed in the trace, not replayed: `call ERRNO` -> count.
    pub failed_in_trace: BTreeMap<String, u64>,
    /// Calls with an effect the replay does not model, by name.
    pub unsupported: BTreeMap<String, u64>,
    /// Calls without effect on translations, by name.
    pub no_effect: BTreeMap<String, u64>,
    /// Replayed calls the simulation refused: `call: error` -> count.
    pub sim_errors: BTreeMap<String, u64>,
    /// Ranges that could not be placed in the arena.
    pub untranslatable: u64,
    /// Calls replayed later than printed: placed by the kernel in memory another task's
    /// call, still in flight, had freed (see the module docs).
    pub reordered: u64,
    /// CPU reads and writes of touched pages.
    pub cpu_reads: u64,
    /// CPU writes.
    pub cpu_writes: u64,
    /// Device accesses that went through (touches and probes).
    pub device_accesses: u64,
    /// Probe accesses the device correctly could not make (nothing mapped there).
    pub probes_refused: u64,
    /// Device accesses that failed on a touched page: `secondary: error` -> count.
    pub device_errors: BTreeMap<String, u64>,
    /// Invalidations by event (snake_case, `_nonblockable` appended when so), plus
    /// `release`.
    pub events: BTreeMap<String, u64>,
    /// Per secondary (summed over address spaces): name and counters.
    pub secondaries: Vec<(String, SecondaryStats)>,
    /// The violations kept (the first thousand).
    pub violations: Vec<Violation>,
    /// All violations.
    pub violation_count: u64,
    /// Checks the checkers made.
    pub checks: u64,
    /// Wall-clock time of the replay (parsing included).
    pub elapsed: Duration,
}

/// Counts invalidations by event, over every address space of the replay.
#[derive(Default)]
struct EventCounter {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl EventCounter {
    fn bump(&self, key: String) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

impl ListSubscriber for EventCounter {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        let mut key = snake(&format!("{:?}", r.event()));
        if !r.blockable() {
            key.push_str("_nonblockable");
        }
        self.bump(key);
        Ok(())
    }
    fn release(&self) {
        self.bump("release".into());
    }
}

/// `ProtectionVma` -> `protection_vma`.
fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The program's slots -> arena slots (see the module docs).
#[derive(Default)]
struct Translation {
    slots: BTreeMap<u64, u64>,
    used: BTreeMap<u64, u64>,
}

impl Translation {
    /// The arena address of the program's `[addr, addr + len)` (at least one byte),
    /// placing its slots if new; `None` if it cannot be placed contiguously.
    fn range(&mut self, addr: u64, len: u64) -> Option<u64> {
        let last = addr.checked_add(len.max(1) - 1)?;
        let (r0, r1) = (addr >> SLOT_SHIFT, last >> SLOT_SHIFT);
        let n = r1 - r0 + 1;
        let mut base = None;
        for r in r0..=r1 {
            if let Some(&s) = self.slots.get(&r) {
                let b = s.checked_sub(r - r0)?;
                if base.is_some_and(|x| x != b) {
                    return None;
                }
                base = Some(b);
            }
        }
        let base = match base {
            Some(b) => b,
            None => self.free_run(r0, r1, n)?,
        };
        if base + n > ARENA_SLOTS {
            return None;
        }
        for r in r0..=r1 {
            let s = base + (r - r0);
            if !self.slots.contains_key(&r) {
                if self.used.contains_key(&s) {
                    return None;
                }
                self.slots.insert(r, s);
                self.used.insert(s, r);
            }
        }
        Some(ARENA_BASE + (base << SLOT_SHIFT) + (addr & (SLOT - 1)))
    }

    /// Where `n` new slots for the program's `r0..=r1` go: right after the slot of `r0 -
    /// 1` or right before that of `r1 + 1` if placed and free there, else after every
    /// used slot with one free slot between (room for a neighbour to come).
    fn free_run(&self, r0: u64, r1: u64, n: u64) -> Option<u64> {
        let free = |b: u64| b + n <= ARENA_SLOTS && (b..b + n).all(|s| !self.used.contains_key(&s));
        let below = r0
            .checked_sub(1)
            .and_then(|r| self.slots.get(&r))
            .map(|s| s + 1);
        let above = self.slots.get(&(r1 + 1)).and_then(|s| s.checked_sub(n));
        below
            .into_iter()
            .chain(above)
            .find(|&b| free(b))
            .or_else(|| {
                let next = self.used.keys().next_back().map_or(1, |s| s + 2);
                free(next).then_some(next)
            })
    }

    /// The program's address of an arena address, if placed.
    fn real(&self, sim: u64) -> Option<u64> {
        let s = sim.checked_sub(ARENA_BASE)? >> SLOT_SHIFT;
        let r = self.used.get(&s)?;
        Some((r << SLOT_SHIFT) + (sim & (SLOT - 1)))
    }
}

/// One simulated address space and what is attached to it.
struct Space {
    mm: Arc<AddressSpace>,
    checker: Arc<Checker>,
    devices: Vec<(String, Arc<dyn SecondaryMmu>)>,
    events: Option<ListRegistration>,
    /// The heap: the program's initial break and its current end (page aligned).
    brk: Option<(u64, u64)>,
    /// The program image of memory mapped at `execve` (see the module docs).
    image: Arc<File>,
    tasks: u64,
}

/// The whole replay.
struct Replay<'a> {
    o: &'a StraceOptions,
    frames: Arc<FrameAllocator>,
    counter: Arc<EventCounter>,
    tr: Translation,
    spaces: HashMap<u64, Space>,
    next_space: u64,
    /// Task -> its address space (none before its first memory call or after execve).
    tasks: HashMap<u32, Option<u64>>,
    /// Clones in flight: parent, shares the address space.
    clones: Vec<(u32, bool)>,
    /// Per task, the call it is inside (between its two halves).
    inflight: HashMap<u32, String>,
    /// Calls waiting for a call in flight (see `blocked`), in trace order.
    deferred: Vec<parse::Call>,
    files: HashMap<String, Arc<File>>,
    value: u64,
    r: StraceReport,
    stats: BTreeMap<String, SecondaryStats>,
    order: Vec<String>,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, u64>, k: K) {
    *m.entry(k).or_default() += 1;
}

fn page_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

fn page_up(a: u64) -> u64 {
    a.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// `PROT_*` flags -> what the simulation models (write and exec imply read, as on x86).
fn prot_of(s: &str) -> Prot {
    let write = parse::has_flag(s, "PROT_WRITE", 2);
    let read = write || parse::has_flag(s, "PROT_READ", 1) || parse::has_flag(s, "PROT_EXEC", 4);
    Prot { read, write }
}

/// The holes of `[start, end)` in `mm`'s layout.
fn holes(mm: &AddressSpace, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    for v in mm.vmas() {
        if v.end <= at || v.start >= end {
            continue;
        }
        if v.start > at {
            out.push((at, v.start));
        }
        at = v.end;
    }
    if at < end {
        out.push((at, end));
    }
    out
}

impl<'a> Replay<'a> {
    fn new(o: &'a StraceOptions) -> Self {
        let mut order = o.secondaries.clone();
        order.extend(o.broken.map(|b| b.name().to_string()));
        Replay {
            o,
            frames: Arc::new(FrameAllocator::new(o.frames)),
            counter: Arc::default(),
            tr: Translation::default(),
            spaces: HashMap::new(),
            next_space: 0,
            tasks: HashMap::new(),
            clones: Vec::new(),
            inflight: HashMap::new(),
            deferred: Vec::new(),
            files: HashMap::new(),
            value: 0,
            r: StraceReport::default(),
            stats: BTreeMap::new(),
            order,
        }
    }

    /// Attaches the checker and every secondary over the arena to `mm` (a new one, or a
    /// fork's child). KVM's memslot must cover mapped memory when it is added: the arena's
    /// holes are filled for KVM's attach only and emptied again before the others attach
    /// (so only KVM sees those invalidations, and none is counted as an event).
    fn add_space(&mut self, mm: Arc<AddressSpace>, brk: Option<(u64, u64)>) -> Result<u64, String> {
        let checker = Checker::new(self.o.seed);
        mm.attach_checker(checker.clone())
            .map_err(|_| "a checker is already attached".to_string())?;
        let mut slots: Vec<Option<(String, Arc<dyn SecondaryMmu>)>> =
            vec![None; self.o.secondaries.len()];
        for needs_mapped in [true, false] {
            let fill = if needs_mapped {
                holes(&mm, ARENA_BASE, TASK_SIZE)
            } else {
                Vec::new()
            };
            for &(s, e) in &fill {
                mm.mmap(e - s, Prot::NONE, MapKind::AnonPrivate, Some(s))
                    .map_err(|e| format!("preparing the arena: {e}"))?;
            }
            for (slot, name) in slots.iter_mut().zip(&self.o.secondaries) {
                if (name == "kvm") == needs_mapped {
                    let d = crate::attach::attach(name, &mm, ARENA_BASE, ARENA_LEN)?;
                    *slot = Some((name.clone(), d));
                }
            }
            for &(s, e) in &fill {
                mm.munmap(s, e - s)
                    .map_err(|e| format!("preparing the arena: {e}"))?;
            }
        }
        let mut devices: Vec<(String, Arc<dyn SecondaryMmu>)> =
            slots.into_iter().flatten().collect();
        if let Some(b) = self.o.broken {
            let d = BrokenSecondary::new(&mm, b, ARENA_BASE, ARENA_LEN)
                .map_err(|e| format!("attaching {}: {e}", b.name()))?;
            devices.push((b.name().to_string(), d as Arc<dyn SecondaryMmu>));
        }
        let events = mm
            .notifier()
            .register(self.counter.clone())
            .map_err(|e| e.to_string())?;
        let id = self.next_space;
        self.next_space += 1;
        self.r.trace.address_spaces += 1;
        let image = File::new(self.frames.clone());
        self.spaces.insert(
            id,
            Space {
                mm,
                checker,
                devices,
                events: Some(events),
                brk,
                image,
                tasks: 0,
            },
        );
        Ok(id)
    }

    /// The address space of `pid`, created (fresh) if it has none yet.
    fn space_of(&mut self, pid: u32) -> Result<u64, String> {
        if let Some(Some(id)) = self.tasks.get(&pid) {
            return Ok(*id);
        }
        self.task_seen(pid)?;
        if let Some(Some(id)) = self.tasks.get(&pid) {
            return Ok(*id);
        }
        let mm = AddressSpace::new(self.frames.clone());
        let id = self.add_space(mm, None)?;
        self.join(pid, Some(id));
        Ok(id)
    }

    fn join(&mut self, pid: u32, space: Option<u64>) {
        if let Some(s) = space.and_then(|id| self.spaces.get_mut(&id)) {
            s.tasks += 1;
        }
        self.tasks.insert(pid, space);
    }

    /// A task seen for the first time: the child of a clone still in flight (strace
    /// prints the child's first calls before the parent's clone returns), else a task
    /// whose start the trace does not show.
    fn task_seen(&mut self, pid: u32) -> Result<(), String> {
        if self.tasks.contains_key(&pid) {
            return Ok(());
        }
        self.r.trace.tasks += 1;
        match self.clones.iter().position(|&(p, _)| p != pid) {
            Some(i) => {
                let (parent, vm) = self.clones.remove(i);
                self.child(parent, pid, vm)
            }
            None => {
                self.join(pid, None);
                Ok(())
            }
        }
    }

    /// `child` starts from `parent`: sharing its address space or with a fork of it.
    fn child(&mut self, parent: u32, child: u32, vm: bool) -> Result<(), String> {
        let space = self.tasks.get(&parent).copied().flatten();
        let space = match space {
            None => None,
            Some(id) if vm => {
                bump(&mut self.r.ops, "thread_or_vfork");
                Some(id)
            }
            Some(id) => {
                let (mm, brk) = {
                    let s = &self.spaces[&id];
                    (s.mm.fork(), s.brk)
                };
                bump(&mut self.r.ops, "fork");
                Some(self.add_space(mm, brk)?)
            }
        };
        self.join(child, space);
        Ok(())
    }

    /// `pid` leaves its address space (ended or exec'd); the last task out exits it.
    fn leave(&mut self, pid: u32) {
        let Some(Some(id)) = self.tasks.insert(pid, None) else {
            return;
        };
        let s = self.spaces.get_mut(&id).expect("a task's space exists");
        s.tasks -= 1;
        if s.tasks == 0 {
            let s = self.spaces.remove(&id).expect("just found");
            self.finish(s);
        }
    }

    /// Exits an address space and collects what its checker and secondaries saw.
    fn finish(&mut self, mut s: Space) {
        s.mm.exit();
        for (name, d) in &s.devices {
            let st = d.stats();
            let t = self.stats.entry(name.clone()).or_default();
            t.fills += st.fills;
            t.retries += st.retries;
            t.invalidations += st.invalidations;
            t.would_blocks += st.would_blocks;
            t.accesses += st.accesses;
        }
        let c = &s.checker;
        self.r.violation_count += c.violation_count();
        self.r.checks += c.checks();
        let room = KEPT.saturating_sub(self.r.violations.len());
        self.r
            .violations
            .extend(c.violations().into_iter().take(room));
        drop(s.events.take());
        s.devices.clear();
    }

    fn sim_error(&mut self, call: &str, e: impl std::fmt::Display) {
        bump(&mut self.r.sim_errors, format!("{call}: {e}"));
    }

    /// Touches up to `touch_pages` pages of `[start, start + len)` (arena addresses):
    /// the CPU, then every secondary.
    fn touch(&mut self, id: u64, start: u64, len: u64, write: bool) {
        let pages = len.div_ceil(PAGE_SIZE);
        let k = self.o.touch_pages.min(pages);
        for i in 0..k {
            let idx = if k == 1 { 0 } else { i * (pages - 1) / (k - 1) };
            let p = start + idx * PAGE_SIZE;
            self.value += 1;
            let v = self.value;
            let s = &self.spaces[&id];
            let cpu = if write {
                s.mm.write(p, v).map(|_| ())
            } else {
                s.mm.read(p).map(|_| ())
            };
            let mut errors = Vec::new();
            if let Err(e) = cpu {
                errors.push(format!("cpu {}: {e}", if write { "write" } else { "read" }));
            }
            let mut ok = 0;
            for (name, d) in &s.devices {
                match d.access(p, write.then_some(v)) {
                    Ok(_) => ok += 1,
                    Err(e) => errors.push(format!("{name}: {e}")),
                }
            }
            if write {
                self.r.cpu_writes += 1;
            } else {
                self.r.cpu_reads += 1;
            }
            self.r.device_accesses += ok;
            for e in errors {
                bump(&mut self.r.device_errors, e);
            }
        }
    }

    /// Every secondary reads `addr` again after a call that took it away or changed it.
    fn probe(&mut self, id: u64, addr: u64) {
        let s = &self.spaces[&id];
        for (_, d) in &s.devices {
            match d.access(addr, None) {
                Ok(_) => self.r.device_accesses += 1,
                Err(_) => self.r.probes_refused += 1,
            }
        }
    }

    /// Maps the holes of `[start, end)` as the program image (see the module docs).
    fn materialize(&mut self, id: u64, start: u64, end: u64) {
        let s = &self.spaces[&id];
        let hs = holes(&s.mm, start, end);
        for (hs, he) in hs {
            let s = &self.spaces[&id];
            let kind = MapKind::File {
                file: s.image.clone(),
                offset: hs - ARENA_BASE,
                shared: false,
            };
            match s.mm.mmap(he - hs, Prot::READ_WRITE, kind, Some(hs)) {
                Ok(_) => {
                    bump(&mut self.r.ops, "image_map");
                    self.touch(id, hs, he - hs, true);
                }
                Err(e) => self.sim_error("image map", e),
            }
        }
    }

    /// The arena range of the program's `[addr, addr + len)`, counted if untranslatable.
    fn place(&mut self, addr: u64, len: u64) -> Option<u64> {
        let r = self.tr.range(addr, len);
        if r.is_none() {
            self.r.untranslatable += 1;
        }
        r
    }

    fn record(&mut self, rec: Record) -> Result<(), String> {
        match rec {
            Record::Note => Ok(()),
            Record::TaskEnd { pid } => {
                self.task_seen(pid)?;
                self.inflight.remove(&pid);
                self.flush_deferred(Some(pid))?;
                self.leave(pid);
                self.tasks.remove(&pid);
                self.clones.retain(|&(p, _)| p != pid);
                self.retry_deferred()
            }
            Record::Unfinished { pid, name, args } => {
                self.task_seen(pid)?;
                let vm = match name.as_str() {
                    "vfork" => Some(true),
                    "fork" => Some(false),
                    "clone" | "clone3" => Some(parse::clone_vm(&args)),
                    _ => None,
                };
                if let Some(vm) = vm {
                    self.clones.push((pid, vm));
                }
                self.inflight.insert(pid, name);
                Ok(())
            }
            Record::Call(c) => {
                self.r.trace.calls += 1;
                bump(&mut self.r.trace.by_name, c.name.clone());
                self.task_seen(c.pid)?;
                self.inflight.remove(&c.pid);
                if matches!(c.name.as_str(), "clone" | "clone3" | "fork" | "vfork") {
                    self.clones.retain(|&(p, _)| p != c.pid);
                }
                if self.deferred.iter().any(|d| d.pid == c.pid) || self.blocked(&c) {
                    self.r.reordered += 1;
                    self.deferred.push(c);
                    return Ok(());
                }
                self.dispatch(&c)?;
                self.retry_deferred()
            }
        }
    }

    fn dispatch(&mut self, c: &parse::Call) -> Result<(), String> {
        match &c.ret {
            Ret::Error(e) => {
                bump(&mut self.r.failed_in_trace, format!("{} {e}", c.name));
                Ok(())
            }
            Ret::Unknown => {
                bump(&mut self.r.no_effect, c.name.clone());
                Ok(())
            }
            Ret::Value(v) => self.call(c, *v),
        }
    }

    // ----- calls whose effect came before another task's completion ------------------
    //
    // A call takes effect somewhere between its two halves: when threads overlap, a
    // `munmap` or a moving `mremap` may free a range that another thread's `mmap` is
    // handed before the first call's result is printed. The kernel places a new mapping
    // (`mmap` without `MAP_FIXED`, a moving `mremap` without `MREMAP_FIXED`) only in free
    // space; so when its range is still mapped in the simulation while a task of the same
    // address space is inside a call that frees memory, it waits (with every later call
    // of its task) until that call completes, then replays. At a task's end and at the
    // trace's end whatever still waits replays as it is.

    /// Whether `c` must wait for a call in flight (see above).
    fn blocked(&mut self, c: &parse::Call) -> bool {
        let Ret::Value(ret) = c.ret else {
            return false;
        };
        let arg = |i: usize| c.args.get(i).map(String::as_str).unwrap_or("");
        let len = match c.name.as_str() {
            "mmap" | "mmap2"
                if !parse::has_flag(arg(3), "MAP_FIXED", 0x10)
                    && !parse::has_flag(arg(3), "MAP_FIXED_NOREPLACE", 0x100000) =>
            {
                parse::number(arg(1))
            }
            "mremap"
                if parse::number(arg(0)) != Some(ret)
                    && !parse::has_flag(arg(3), "MREMAP_FIXED", 2) =>
            {
                parse::number(arg(2))
            }
            _ => None,
        };
        let (Some(len), Some(Some(id))) = (len.filter(|&l| l > 0), self.tasks.get(&c.pid).copied())
        else {
            return false;
        };
        let freeing = self.inflight.iter().any(|(p, name)| {
            *p != c.pid
                && matches!(name.as_str(), "munmap" | "mremap" | "brk")
                && self.tasks.get(p).copied().flatten() == Some(id)
        });
        if !freeing {
            return false;
        }
        let Some(sim) = self.tr.range(ret, len) else {
            return false;
        };
        let end = sim.saturating_add(page_up(len));
        holes(&self.spaces[&id].mm, sim, end) != [(sim, end)]
    }

    /// Replays the waiting calls that no longer wait, in order.
    fn retry_deferred(&mut self) -> Result<(), String> {
        loop {
            let waiting = std::mem::take(&mut self.deferred);
            let mut progress = false;
            let mut still: Vec<parse::Call> = Vec::new();
            for c in waiting {
                if still.iter().any(|d| d.pid == c.pid) || self.blocked(&c) {
                    still.push(c);
                } else {
                    self.dispatch(&c)?;
                    progress = true;
                }
            }
            self.deferred = still;
            if !progress || self.deferred.is_empty() {
                return Ok(());
            }
        }
    }

    /// Replays the waiting calls of `pid` (of every task if `None`) as they are.
    fn flush_deferred(&mut self, pid: Option<u32>) -> Result<(), String> {
        let waiting = std::mem::take(&mut self.deferred);
        for c in waiting {
            if pid.is_none() || pid == Some(c.pid) {
                self.dispatch(&c)?;
            } else {
                self.deferred.push(c);
            }
        }
        Ok(())
    }

    fn call(&mut self, c: &parse::Call, ret: u64) -> Result<(), String> {
        let a = |i: usize| c.args.get(i).map(String::as_str).unwrap_or("");
        let num = |i: usize| parse::number(a(i));
        match c.name.as_str() {
            "mmap" | "mmap2" => {
                let (Some(len), Some(off)) = (num(1), num(5)) else {
                    bump(&mut self.r.unsupported, format!("{} (arguments)", c.name));
                    return Ok(());
                };
                let off = if c.name == "mmap2" {
                    off * PAGE_SIZE
                } else {
                    off
                };
                self.mmap(c.pid, ret, len, prot_of(a(2)), a(3), a(4), off)
            }
            "munmap" => {
                let (Some(addr), Some(len)) = (num(0), num(1)) else {
                    bump(&mut self.r.unsupported, "munmap (arguments)".into());
                    return Ok(());
                };
                let id = self.space_of(c.pid)?;
                let Some(sim) = self.place(addr, len) else {
                    return Ok(());
                };
                bump(&mut self.r.ops, "munmap");
                if let Err(e) = self.spaces[&id].mm.munmap(sim, len) {
                    self.sim_error("munmap", e);
                }
                self.probe(id, page_down(sim));
                Ok(())
            }
            "mprotect" | "pkey_mprotect" => {
                let (Some(addr), Some(len)) = (num(0), num(1)) else {
                    bump(&mut self.r.unsupported, format!("{} (arguments)", c.name));
                    return Ok(());
                };
                let prot = prot_of(a(2));
                let id = self.space_of(c.pid)?;
                if len == 0 {
                    bump(&mut self.r.no_effect, c.name.clone());
                    return Ok(());
                }
                let Some(sim) = self.place(addr, len) else {
                    return Ok(());
                };
                let end = sim + page_up(len);
                self.materialize(id, sim, end);
                bump(&mut self.r.ops, "mprotect");
                if let Err(e) = self.spaces[&id].mm.mprotect(sim, len, prot) {
                    self.sim_error("mprotect", e);
                }
                if prot.read {
                    self.touch(id, sim, len, prot.write);
                } else {
                    self.probe(id, sim);
                }
                Ok(())
            }
            "madvise" => {
                let (Some(addr), Some(len)) = (num(0), num(1)) else {
                    bump(&mut self.r.unsupported, "madvise (arguments)".into());
                    return Ok(());
                };
                let advice = match a(2) {
                    "MADV_DONTNEED" | "4" => Advice::DontNeed,
                    "MADV_FREE" | "8" => Advice::Free,
                    other => {
                        bump(&mut self.r.no_effect, format!("madvise {other}"));
                        return Ok(());
                    }
                };
                let id = self.space_of(c.pid)?;
                if len == 0 {
                    bump(&mut self.r.no_effect, "madvise".into());
                    return Ok(());
                }
                let Some(sim) = self.place(addr, len) else {
                    return Ok(());
                };
                self.materialize(id, sim, sim + page_up(len));
                bump(
                    &mut self.r.ops,
                    if advice == Advice::DontNeed {
                        "madvise_dontneed"
                    } else {
                        "madvise_free"
                    },
                );
                if let Err(e) = self.spaces[&id].mm.madvise(sim, len, advice) {
                    self.sim_error("madvise", e);
                }
                self.probe(id, sim);
                Ok(())
            }
            "mremap" => self.mremap(c, ret),
            "brk" => self.brk(c.pid, num(0).unwrap_or(0), ret),
            "clone" | "clone3" | "fork" | "vfork" => {
                let Ok(child) = u32::try_from(ret) else {
                    return Ok(());
                };
                if child == 0 || self.tasks.contains_key(&child) {
                    // The child's own return, or a child already adopted.
                    return Ok(());
                }
                let vm = match c.name.as_str() {
                    "vfork" => true,
                    "fork" => false,
                    _ => parse::clone_vm(&c.args),
                };
                self.r.trace.tasks += 1;
                self.child(c.pid, child, vm)
            }
            "execve" | "execveat" => {
                bump(&mut self.r.ops, "execve");
                self.leave(c.pid);
                Ok(())
            }
            "shmat" | "shmdt" | "remap_file_pages" | "process_madvise" | "process_mrelease"
            | "map_shadow_stack" | "mseal" | "process_vm_writev" => {
                bump(&mut self.r.unsupported, c.name.clone());
                Ok(())
            }
            _ => {
                bump(&mut self.r.no_effect, c.name.clone());
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn mmap(
        &mut self,
        pid: u32,
        ret: u64,
        len: u64,
        prot: Prot,
        flags: &str,
        fd: &str,
        off: u64,
    ) -> Result<(), String> {
        // MAP_SHARED is bit 0 (MAP_SHARED_VALIDATE has it too), MAP_ANONYMOUS 0x20.
        let anon = parse::has_flag(flags, "MAP_ANONYMOUS", 0x20)
            || parse::has_flag(flags, "MAP_ANON", 0x20);
        let shared = parse::has_flag(flags, "MAP_SHARED", 1)
            || parse::has_flag(flags, "MAP_SHARED_VALIDATE", 1);
        let (kind, op) = if anon {
            if shared {
                (MapKind::AnonShared, "mmap_anon_shared")
            } else {
                (MapKind::AnonPrivate, "mmap_anon_private")
            }
        } else {
            let key = match parse::fd(fd) {
                Some((_, Some(path))) => path.to_string(),
                Some((n, None)) => format!("fd {n}"),
                None => {
                    bump(&mut self.r.unsupported, "mmap (descriptor)".into());
                    return Ok(());
                }
            };
            let frames = self.frames.clone();
            let file = self
                .files
                .entry(key)
                .or_insert_with(|| File::new(frames))
                .clone();
            let op = if shared {
                "mmap_file_shared"
            } else {
                "mmap_file_private"
            };
            (
                MapKind::File {
                    file,
                    offset: off,
                    shared,
                },
                op,
            )
        };
        let id = self.space_of(pid)?;
        if len == 0 {
            return Ok(());
        }
        let Some(sim) = self.place(ret, len) else {
            return Ok(());
        };
        bump(&mut self.r.ops, op);
        if let Err(e) = self.spaces[&id].mm.mmap(len, prot, kind, Some(sim)) {
            self.sim_error("mmap", e);
            return Ok(());
        }
        if prot.read {
            self.touch(id, sim, len, prot.write);
        }
        Ok(())
    }

    fn mremap(&mut self, c: &parse::Call, ret: u64) -> Result<(), String> {
        let n = |i: usize| c.args.get(i).and_then(|a| parse::number(a));
        let (Some(old), Some(old_len), Some(new_len)) = (n(0), n(1), n(2)) else {
            bump(&mut self.r.unsupported, "mremap (arguments)".into());
            return Ok(());
        };
        if c.args
            .get(3)
            .is_some_and(|f| parse::has_flag(f, "MREMAP_DONTUNMAP", 4))
        {
            bump(&mut self.r.unsupported, "mremap MREMAP_DONTUNMAP".into());
            return Ok(());
        }
        let id = self.space_of(c.pid)?;
        let Some(sim_old) = self.place(old, old_len.max(if ret == old { new_len } else { 0 }))
        else {
            return Ok(());
        };
        let (flags, op) = if ret == old {
            (MremapFlags::default(), "mremap_in_place")
        } else {
            let Some(sim_new) = self.place(ret, new_len) else {
                return Ok(());
            };
            let f = MremapFlags {
                may_move: true,
                fixed: Some(sim_new),
            };
            (f, "mremap_move")
        };
        bump(&mut self.r.ops, op);
        let mm = self.spaces[&id].mm.clone();
        match mm.mremap(sim_old, old_len, new_len, flags) {
            Ok(at) => {
                if flags.fixed.is_some() || new_len < old_len {
                    self.probe(id, sim_old + if ret == old { page_up(new_len) } else { 0 });
                }
                let prot = mm
                    .vmas()
                    .into_iter()
                    .find(|v| v.start <= at && at < v.end)
                    .map_or(Prot::NONE, |v| v.prot);
                if prot.read {
                    self.touch(id, at, new_len, prot.write);
                }
            }
            Err(e) => self.sim_error("mremap", e),
        }
        Ok(())
    }

    fn brk(&mut self, pid: u32, asked: u64, ret: u64) -> Result<(), String> {
        let id = self.space_of(pid)?;
        let heap = self.spaces[&id].brk;
        let Some((start, end)) = heap else {
            // The first break seen is the heap's start.
            self.spaces.get_mut(&id).expect("exists").brk = Some((ret, page_up(ret)));
            bump(&mut self.r.ops, "brk_query");
            return Ok(());
        };
        if asked == 0 || asked < start {
            bump(&mut self.r.ops, "brk_query");
            return Ok(());
        }
        if ret != asked {
            // The kernel refused: it returns the break unchanged.
            bump(&mut self.r.failed_in_trace, "brk (unchanged)".into());
            return Ok(());
        }
        let new_end = page_up(ret);
        self.spaces.get_mut(&id).expect("exists").brk = Some((start, new_end));
        if new_end == end {
            bump(&mut self.r.ops, "brk_same_page");
            return Ok(());
        }
        let (lo, hi) = (end.min(new_end), end.max(new_end));
        let Some(sim) = self.place(lo, hi - lo) else {
            return Ok(());
        };
        let mm = self.spaces[&id].mm.clone();
        if new_end > end {
            bump(&mut self.r.ops, "brk_grow");
            match mm.mmap(hi - lo, Prot::READ_WRITE, MapKind::AnonPrivate, Some(sim)) {
                Ok(_) => self.touch(id, sim, hi - lo, true),
                Err(e) => self.sim_error("brk", e),
            }
        } else {
            bump(&mut self.r.ops, "brk_shrink");
            if let Err(e) = mm.munmap(sim, hi - lo) {
                self.sim_error("brk", e);
            }
            self.probe(id, sim);
        }
        Ok(())
    }

    fn into_report(mut self, parser: &Parser, started: Instant) -> StraceReport {
        if let Err(e) = self.flush_deferred(None) {
            self.sim_error("end of trace", e);
        }
        let ids: Vec<u64> = self.spaces.keys().copied().collect();
        for id in ids {
            let s = self.spaces.remove(&id).expect("listed");
            self.finish(s);
        }
        self.r.trace.never_resumed = parser.unfinished() as u64;
        self.r.events = self
            .counter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let stats = std::mem::take(&mut self.stats);
        self.r.secondaries = self
            .order
            .iter()
            .map(|n| (n.clone(), stats.get(n).copied().unwrap_or_default()))
            .collect();
        // Show the program's addresses, not the arena's.
        for v in &mut self.r.violations {
            if let Some(real) = self.tr.real(v.addr) {
                v.detail = format!("{} (program address {real:#x})", v.detail);
            }
        }
        self.r.elapsed = started.elapsed();
        self.r
    }
}

/// Replays the strace output at `path` (see the module docs), read line by line.
pub fn replay_strace(path: &Path, o: &StraceOptions) -> Result<StraceReport, StraceError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(StraceError::Read)?;
    let mut reader = std::io::BufReader::new(file);
    let mut run = Run::start(o)?;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader
            .read_until(b'\n', &mut buf)
            .map_err(StraceError::Read)?
            == 0
        {
            break;
        }
        run.line(&String::from_utf8_lossy(&buf), buf.len())?;
    }
    Ok(run.finish())
}

/// Replays strace output held in memory.
#[cfg(test)]
pub fn replay_text(text: &str, o: &StraceOptions) -> Result<StraceReport, StraceError> {
    let mut run = Run::start(o)?;
    for line in text.split_inclusive('\n') {
        run.line(line, line.len())?;
    }
    Ok(run.finish())
}

/// A replay in progress: the parser and the replay state.
struct Run<'a> {
    replay: Replay<'a>,
    parser: Parser,
    started: Instant,
}

impl<'a> Run<'a> {
    fn start(o: &'a StraceOptions) -> Result<Self, StraceError> {
        if o.secondaries.is_empty() && o.broken.is_none() {
            return Err(StraceError::Setup("no secondary to attach".into()));
        }
        Ok(Run {
            replay: Replay::new(o),
            parser: Parser::default(),
            started: Instant::now(),
        })
    }

    /// One line, and its size in bytes.
    fn line(&mut self, line: &str, bytes: usize) -> Result<(), StraceError> {
        let t = &mut self.replay.r.trace;
        t.lines += 1;
        t.bytes += bytes as u64;
        match self.parser.line(line) {
            Ok(rec) => self.replay.record(rec).map_err(StraceError::Setup),
            Err(_) => {
                self.replay.r.trace.unparsed_lines += 1;
                Ok(())
            }
        }
    }

    fn finish(self) -> StraceReport {
        self.replay.into_report(&self.parser, self.started)
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_map<K: AsRef<str>>(m: &BTreeMap<K, u64>) -> String {
    let body: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_str(k.as_ref())))
        .collect();
    format!("{{{}}}", body.join(","))
}

impl StraceReport {
    /// Operations replayed.
    pub fn total_ops(&self) -> u64 {
        self.ops.values().sum()
    }

    /// Calls per second of wall-clock time.
    pub fn calls_per_sec(&self) -> f64 {
        self.trace.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report as text tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let t = &self.trace;
        let _ = writeln!(
            out,
            "trace: {} bytes, {} lines, {} calls ({} unparsed lines, {} never resumed), {} tasks, {} address spaces",
            t.bytes, t.lines, t.calls, t.unparsed_lines, t.never_resumed, t.tasks, t.address_spaces
        );
        let _ = writeln!(
            out,
            "replayed {} operations in {:.2} s ({:.0} calls/s), {} checks\n",
            self.total_ops(),
            self.elapsed.as_secs_f64(),
            self.calls_per_sec(),
            self.checks
        );
        let section = |out: &mut String, title: &str, m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                return;
            }
            let _ = writeln!(out, "{title:<40}{:>10}", "count");
            for (k, v) in m {
                let _ = writeln!(out, "  {k:<38}{v:>10}");
            }
            out.push('\n');
        };
        let ops: BTreeMap<String, u64> =
            self.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        section(&mut out, "operation", &ops);
        section(&mut out, "invalidation event", &self.events);
        section(
            &mut out,
            "failed in the trace (not replayed)",
            &self.failed_in_trace,
        );
        section(&mut out, "not modelled (not replayed)", &self.unsupported);
        section(&mut out, "no effect on translations", &self.no_effect);
        section(&mut out, "refused by the simulation", &self.sim_errors);
        section(
            &mut out,
            "device errors on touched pages",
            &self.device_errors,
        );
        let _ = writeln!(
            out,
            "pages touched: {} cpu reads, {} cpu writes; {} device accesses, {} probes refused; {} untranslatable ranges, {} calls reordered\n",
            self.cpu_reads, self.cpu_writes, self.device_accesses, self.probes_refused, self.untranslatable, self.reordered
        );
        let _ = writeln!(
            out,
            "{:<30}{:>10}{:>10}{:>10}{:>12}{:>12}",
            "secondary", "fills", "retries", "wouldblk", "invalidate", "accesses"
        );
        for (n, s) in &self.secondaries {
            let _ = writeln!(
                out,
                "{n:<30}{:>10}{:>10}{:>10}{:>12}{:>12}",
                s.fills, s.retries, s.would_blocks, s.invalidations, s.accesses
            );
        }
        let _ = writeln!(out, "\nviolations: {}", self.violation_count);
        for v in self.violations.iter().take(10) {
            let _ = writeln!(out, "  {v}");
        }
        out
    }

    /// The report as JSON (snake_case keys; addresses as hex strings).
    pub fn json(&self) -> String {
        let t = &self.trace;
        let ops: BTreeMap<String, u64> =
            self.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let secs: Vec<String> = self
            .secondaries
            .iter()
            .map(|(n, s)| {
                format!(
                    "{}:{{\"fills\":{},\"retries\":{},\"would_blocks\":{},\"invalidations\":{},\"accesses\":{}}}",
                    json_str(n),
                    s.fills,
                    s.retries,
                    s.would_blocks,
                    s.invalidations,
                    s.accesses
                )
            })
            .collect();
        let violations: Vec<String> = self
            .violations
            .iter()
            .map(|v| {
                format!(
                    "{{\"kind\":{},\"op\":{},\"addr\":{},\"secondary\":{},\"detail\":{}}}",
                    json_str(&snake(&format!("{:?}", v.kind))),
                    json_str(v.op.as_str()),
                    json_str(&format!("{:#x}", v.addr)),
                    json_str(&v.secondary),
                    json_str(&v.detail)
                )
            })
            .collect();
        format!(
            concat!(
                "{{\"trace\":{{\"bytes\":{},\"lines\":{},\"calls\":{},\"unparsed_lines\":{},",
                "\"never_resumed\":{},\"tasks\":{},\"address_spaces\":{},\"calls_by_name\":{}}},",
                "\"elapsed_secs\":{:.3},\"calls_per_sec\":{:.0},\"total_ops\":{},\"ops\":{},",
                "\"events\":{},\"failed_in_trace\":{},\"unsupported\":{},\"no_effect\":{},",
                "\"sim_errors\":{},\"untranslatable\":{},\"reordered\":{},\"cpu_reads\":{},\"cpu_writes\":{},",
                "\"device_accesses\":{},\"probes_refused\":{},\"device_errors\":{},",
                "\"secondaries\":{{{}}},\"checks\":{},\"violation_count\":{},",
                "\"violations_truncated\":{},\"violations\":[{}]}}"
            ),
            t.bytes,
            t.lines,
            t.calls,
            t.unparsed_lines,
            t.never_resumed,
            t.tasks,
            t.address_spaces,
            json_map(&t.by_name),
            self.elapsed.as_secs_f64(),
            self.calls_per_sec(),
            self.total_ops(),
            json_map(&ops),
            json_map(&self.events),
            json_map(&self.failed_in_trace),
            json_map(&self.unsupported),
            json_map(&self.no_effect),
            json_map(&self.sim_errors),
            self.untranslatable,
            self.reordered,
            self.cpu_reads,
            self.cpu_writes,
            self.device_accesses,
            self.probes_refused,
            json_map(&self.device_errors),
            secs.join(","),
            self.checks,
            self.violation_count,
            self.violation_count > self.violations.len() as u64,
            violations.join(",")
        )
    }
}

/// `mmn replay FILE` of a strace trace: prints the report; exit 1 on any violation, 2 if
/// the replay could not run.
pub fn cli(
    path: &Path,
    secondaries: Vec<String>,
    broken: Option<String>,
    touch_pages: u64,
    json: bool,
) -> ExitCode {
    let broken = match broken.as_deref().map(|b| (b, Broken::from_name(b))) {
        None => None,
        Some((_, Some(b))) => Some(b),
        Some((name, None)) => {
            let names: Vec<&str> = Broken::ALL.iter().map(|b| b.name()).collect();
            eprintln!(
                "error: unknown --broken {name:?}; one of: {}",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    };
    let mut names: Vec<String> = Vec::new();
    for s in secondaries
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        if names.iter().any(|n| n == s) {
            eprintln!("error: secondary {s:?} named twice in --secondaries");
            return ExitCode::from(2);
        }
        names.push(s.to_string());
    }
    let o = StraceOptions {
        secondaries: names,
        broken,
        touch_pages,
        ..StraceOptions::default()
    };
    let report = match replay_strace(path, &o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    if report.trace.calls == 0 && report.trace.unparsed_lines > 0 {
        eprintln!(
            "error: {}: neither an mmn replay file (first line `# mmn replay v1`) nor a strace \
             trace (no system call recognised in {} lines)",
            path.display(),
            report.trace.lines
        );
        return ExitCode::from(2);
    }
    if json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if report.violation_count > 0 {
        eprintln!(
            "error: {} coherence violations replaying {}",
            report.violation_count,
            path.display()
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_keeps_ranges_contiguous_and_reverses() {
        let mut t = Translation::default();
        let a = t.range(0x7fb9_a05e_b000, 0x1000).unwrap();
        assert!((ARENA_BASE..TASK_SIZE).contains(&a));
        assert_eq!(t.real(a), Some(0x7fb9_a05e_b000));
        // The same slot: same offset relation.
        let b = t.range(0x7fb9_a07c_0000, 0x1000).unwrap();
        assert_eq!(b - a, 0x7fb9_a07c_0000 - 0x7fb9_a05e_b000);
        // The slot below is placed right under it (growth downwards stays contiguous).
        let below = (0x7fb9_a05e_b000u64 & !(SLOT - 1)) - 0x2000;
        let c = t.range(below, 0x4000).unwrap();
        assert_eq!(c + 0x2000, a & !(SLOT - 1));
        // A far slot (a 57-bit address) fits too.
        let far = 0x00ff_ffff_0000_0000u64;
        let d = t.range(far, 0x1000).unwrap();
        assert!(d < TASK_SIZE);
        assert_eq!(t.real(d), Some(far));
        assert!(t.range(u64::MAX - 10, 100).is_none(), "wraps");
    }

    const SNIPPET: &str = r#"7 brk(NULL) = 0x555555559000
7 mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000000000
7 mmap(NULL, 16384, PROT_READ, MAP_SHARED, 3</tmp/f>, 0) = 0x7f0000010000
7 mprotect(0x555555557000, 4096, PROT_READ) = 0
7 brk(0x55555557a000) = 0x55555557a000
7 madvise(0x7f0000000000, 4096, MADV_FREE) = 0
7 mremap(0x7f0000000000, 8192, 65536, MREMAP_MAYMOVE <unfinished ...>
7 <... mremap resumed>) = 0x7f0000100000
7 clone3({flags=CLONE_VM|CLONE_THREAD, exit_signal=0} => {parent_tid=[8]}, 88) = 8
7 vfork( <unfinished ...>
9 execve("/bin/true", ["true"], 0x7ffd0 /* 3 vars */) = 0
7 <... vfork resumed>) = 9
7 clone(child_stack=NULL, flags=SIGCHLD) = 10
10 munmap(0x7f0000010000, 16384) = 0
10 +++ exited with 0 +++
7 +++ killed by SIGKILL +++
"#;

    /// Every prefix of every line of a trace (cut arguments, lost results, half
    /// numbers), in one replay: counted, never a panic.
    #[test]
    fn cut_lines_are_counted_never_a_panic() {
        let mut text = String::new();
        for line in SNIPPET.lines() {
            for (i, _) in line.char_indices() {
                text.push_str(&line[..i]);
                text.push('\n');
            }
            text.push_str(line);
            text.push('\n');
        }
        let o = StraceOptions {
            secondaries: vec!["kvm".into(), "sva".into()],
            ..StraceOptions::default()
        };
        let r = replay_text(&text, &o).expect("replays");
        assert!(r.trace.unparsed_lines > 100, "{}", r.table());
        assert!(r.total_ops() > 10, "{}", r.table());
        assert_eq!(r.violation_count, 0, "{}", r.table());
        // And the whole lines alone replay with no refusal.
        let r = replay_text(SNIPPET, &o).expect("replays");
        assert_eq!(r.trace.unparsed_lines, 0, "{}", r.table());
        assert!(r.sim_errors.is_empty(), "{}", r.table());
        assert_eq!(r.ops.get("madvise_free"), Some(&1), "{}", r.table());
        assert_eq!(r.ops.get("mmap_file_shared"), Some(&1), "{}", r.table());
        // 7 and its fork 10 (9 execs and ends with no memory call).
        assert_eq!(r.trace.address_spaces, 2, "{}", r.table());
    }

    /// Thread 1's `mremap` moved its block away, and thread 2's `mmap` got the freed range
    /// before thread 1's result was printed: 2's calls wait for 1's.
    #[test]
    fn a_range_freed_by_a_call_in_flight_is_reused_after_it() {
        let trace = "1 mmap(NULL, 266240, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f73cdca8000
1 clone3({flags=CLONE_VM|CLONE_THREAD, exit_signal=0} => {parent_tid=[2]}, 88) = 2
1 mremap(0x7f73cdca8000, 266240, 528384, MREMAP_MAYMOVE <unfinished ...>
2 mmap(NULL, 266240, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f73cdca8000
2 mremap(0x7f73cdca8000, 266240, 528384, MREMAP_MAYMOVE) = 0x7f73ce000000
1 <... mremap resumed>) = 0x7f73cd426000
1 munmap(0x7f73cd426000, 528384) = 0
";
        let o = StraceOptions {
            secondaries: vec!["kvm".into(), "hmm".into()],
            ..StraceOptions::default()
        };
        let r = replay_text(trace, &o).expect("replays");
        assert_eq!(r.reordered, 2, "{}", r.table());
        assert!(r.sim_errors.is_empty(), "{}", r.table());
        assert_eq!(r.ops.get("mremap_move"), Some(&2), "{}", r.table());
        // Two per move, one for the munmap; none from a mapping placed over a live one.
        assert_eq!(r.events.get("unmap"), Some(&5), "{}", r.table());
        assert_eq!(r.violation_count, 0, "{}", r.table());
    }

    #[test]
    fn snake_case_keys() {
        assert_eq!(snake("ProtectionVma"), "protection_vma");
        assert_eq!(snake("Unmap"), "unmap");
    }
}
