//! # mmu-oracle
//!
//! Runs a script of memory operations twice, on the running Linux kernel and on
//! [`mmu_sim::AddressSpace`], and reports the MMU-notifier calls each made, operation by
//! operation, in one format, so the two can be compared line for line.
//!
//! - The kernel side ([`kernel`]) needs root, `/dev/kvm` and tracefs. A process that has
//!   created a KVM virtual machine has KVM subscribed to its address space, and KVM
//!   emits a tracepoint for every notifier call it receives: `kvm_unmap_hva_range`
//!   (start, end) for `invalidate_range_start`, `kvm_age_hva` for the clear-young calls,
//!   `kvm_test_age_hva` for test-young. The oracle creates its own tracing instance,
//!   follows only the script's processes, and reads the events after each operation.
//! - The simulation side ([`sim`]) subscribes a recorder to each address space.
//! - The [`script`] module has the operations, their text form and a seeded random
//!   generator.
//!
//! Both sides map at the same addresses (a region at [`BASE`], aligned to 512 GiB, far
//! from anything else a process maps), every address is printed in pages from it, and
//! only notifier calls that touch the region (or cover the whole address space) count:
//! the kernel also notifies for the process's own memory (its stack and heap after a
//! fork, say), which the simulation does not have.
//!
//! ```
//! use mmu_oracle::{script, sim};
//!
//! let ops = script::parse("mmap 0 4 anon rw\nmmap 4 4 anon rw\nmadvise 0 8 dontneed\n")?;
//! let steps = sim::run(&ops);
//! // The two mappings are one (Linux merges them): one range.
//! assert_eq!(steps[2].to_string(), "ok P[0,8)");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "mmu-oracle supports Linux only: it observes the kernel's notifier calls through KVM's \
     tracepoints."
);

pub mod kernel;
pub mod script;
pub mod sim;

use std::fmt;

pub use script::{Op, Who};

/// The first address of the region scripts work in: 16 TiB, aligned to 512 GiB (one
/// top-level page-table entry), so both sides have the same page-table geometry.
pub const BASE: u64 = 0x1000_0000_0000;
/// Bytes in a page.
pub const PAGE: u64 = 4096;
/// Bytes of the region after [`BASE`] whose addresses are printed in pages.
pub const REGION: u64 = 4 * script::MAX_PAGES * PAGE;

/// One notifier call, as both sides report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Note {
    /// `invalidate_range_start` of `[start, end)` (bytes).
    Invalidate(Who, u64, u64),
    /// `clear_flush_young` or `clear_young` of `[start, end)` (KVM traces both alike).
    Age(Who, u64, u64),
    /// `test_young` of the page at the address.
    TestAge(Who, u64),
}

impl Note {
    /// Whether the call concerns the script's region (or the whole address space).
    pub fn relevant(&self) -> bool {
        let (s, e) = match *self {
            Note::Invalidate(_, s, e) | Note::Age(_, s, e) => (s, e),
            Note::TestAge(_, a) => (a, a + 1),
        };
        (s == 0 && e == u64::MAX) || (s < BASE + REGION && e > BASE)
    }
}

fn addr(f: &mut fmt::Formatter<'_>, a: u64) -> fmt::Result {
    if (BASE..=BASE + REGION).contains(&a) && (a - BASE) % PAGE == 0 {
        write!(f, "{}", (a - BASE) / PAGE)
    } else {
        write!(f, "{a:#x}")
    }
}

fn who(w: Who) -> &'static str {
    match w {
        Who::Parent => "P",
        Who::Child => "C",
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Note::Invalidate(w, 0, u64::MAX) => write!(f, "{}all", who(w)),
            Note::Invalidate(w, s, e) | Note::Age(w, s, e) => {
                let age = if matches!(self, Note::Age(..)) {
                    "age"
                } else {
                    ""
                };
                write!(f, "{}{age}[", who(w))?;
                addr(f, s)?;
                f.write_str(",")?;
                addr(f, e)?;
                f.write_str(")")
            }
            Note::TestAge(w, a) => {
                write!(f, "{}test-age(", who(w))?;
                addr(f, a)?;
                f.write_str(")")
            }
        }
    }
}

/// What one operation did: its result (`ok` or the errno's name) and the notifier calls
/// it made, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `ok`, or an errno name such as `EFAULT`.
    pub result: String,
    /// The calls touching the region.
    pub notes: Vec<Note>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.result)?;
        for n in &self.notes {
            write!(f, " {n}")?;
        }
        Ok(())
    }
}

/// Differences that come from kernel mechanisms the simulation leaves out on purpose
/// (they add or drop calls without changing what a secondary must do to stay coherent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelOnly {
    /// Reclaim's reverse-map walk (`MADV_PAGEOUT`) visits every mapping that could map
    /// the page (linked to its `anon_vma`, or mapping its file offset) and starts a
    /// one-page `Clear` there before it looks for the page: extra one-page ranges, in a
    /// forked child's mappings (at the same address, or where the child still maps the
    /// file), in another mapping of the same file, or, after `mremap`, in the process's
    /// own mapping at the page's old offset. The classification checks that such a cause
    /// exists earlier in the script.
    RmapWalk,
    /// A page marked by `MADV_FREE` sits in a per-CPU batch that holds a reference, so
    /// reclaim skips it: fewer ranges.
    LazyFreeBatch,
}

impl fmt::Display for KernelOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelOnly::RmapWalk => "reclaim's reverse-map walk notifies another mapping",
            KernelOnly::LazyFreeBatch => "MADV_FREE's per-CPU batch holds a reference",
        })
    }
}

/// The two sides of one script, compared.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The script.
    pub ops: Vec<Op>,
    /// The kernel's steps.
    pub kernel: Vec<Step>,
    /// The simulation's steps.
    pub sim: Vec<Step>,
}

impl Comparison {
    /// Indices of the operations whose steps differ.
    pub fn differences(&self) -> Vec<usize> {
        (0..self.ops.len())
            .filter(|&i| self.kernel.get(i) != self.sim.get(i))
            .collect()
    }

    /// Which known kernel-only behaviour explains the difference at operation `i`, if
    /// one does (see [`KernelOnly`]); `None` for an unexplained difference (or none).
    pub fn explain(&self, i: usize) -> Option<KernelOnly> {
        let (op, k, s) = (self.ops.get(i)?, self.kernel.get(i)?, self.sim.get(i)?);
        if k == s || k.result != s.result {
            return None;
        }
        let pageout = matches!(
            op,
            Op::Madvise {
                advice: script::Advice::PageOut,
                ..
            }
        );
        // `sub` is `sup` with some calls left out, in order.
        let subsequence = |sub: &[Note], sup: &[Note]| {
            let mut it = sup.iter();
            sub.iter().all(|n| it.any(|m| m == n))
        };
        let one_page = |n: &Note| matches!(n, Note::Invalidate(_, s, e) if e - s == PAGE);
        if pageout && subsequence(&s.notes, &k.notes) {
            let mut extra = k.notes.clone();
            for n in &s.notes {
                let at = extra.iter().position(|m| m == n).expect("subsequence");
                extra.remove(at);
            }
            // A duplicate of a page the simulation notified can only be another address
            // space's mapping at the same address (a live forked child); a page
            // elsewhere, an older mapping of the page's offset (a moved mapping).
            let mut child = false;
            for o in &self.ops[..i] {
                match o {
                    Op::Fork => child = true,
                    Op::ChildExit => child = false,
                    _ => {}
                }
            }
            let moved = self.ops[..i].iter().zip(&self.kernel).any(|(o, k)| {
                matches!(
                    o,
                    Op::Mremap { fixed: Some(_), .. } | Op::Mremap { may_move: true, .. }
                ) && k.result == "ok"
            });
            // A file page is found through every mapping of the file.
            let mut memfd_maps = [0usize; script::MEMFDS as usize];
            for o in &self.ops[..i] {
                if let Op::Mmap {
                    kind: script::Kind::Memfd { id, .. },
                    ..
                } = o
                {
                    memfd_maps[*id as usize] += 1;
                }
            }
            let file_alias = memfd_maps.iter().any(|&n| n > 1);
            let explained = |n: &Note| {
                one_page(n)
                    && if s.notes.contains(n) {
                        child
                    } else {
                        moved || child || file_alias
                    }
            };
            if !extra.is_empty() && extra.iter().all(explained) {
                return Some(KernelOnly::RmapWalk);
            }
        }
        if pageout
            && subsequence(&k.notes, &s.notes)
            && self.ops[..i].iter().any(|o| {
                matches!(
                    o,
                    Op::Madvise {
                        advice: script::Advice::Free,
                        ..
                    }
                )
            })
        {
            return Some(KernelOnly::LazyFreeBatch);
        }
        None
    }

    /// Operations compared.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the script was empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations up to and including the first difference, both sides, each
    /// difference marked: a minimal report for a failing script.
    pub fn report(&self, full: bool) -> String {
        let mut out = String::new();
        let first = self.differences().first().copied();
        for (i, op) in self.ops.iter().enumerate() {
            if !full && first.is_some_and(|d| i > d) {
                break;
            }
            let (k, s) = (self.kernel.get(i), self.sim.get(i));
            let show = |x: Option<&Step>| x.map_or("-".to_string(), |x| x.to_string());
            if k == s {
                out += &format!("{i:>4}   {:<40} {}\n", op.to_string(), show(k));
            } else {
                out += &format!("{i:>4} ! {:<40} kernel: {}\n", op.to_string(), show(k));
                out += &format!("{:>4}   {:<40} sim:    {}\n", "", "", show(s));
            }
        }
        out
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report(true))
    }
}
