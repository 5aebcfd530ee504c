//! Scripts of memory operations: the model, its one-line-per-operation text form, and a
//! seeded random generator.
//!
//! Addresses and lengths are in pages, relative to the base of the region the scripts
//! work in ([`crate::BASE`]). One line per operation:
//!
//! ```text
//! mmap AT LEN KIND PROT        KIND: anon | shm | memfd-shared:N:OFF | memfd-private:N:OFF
//! munmap AT LEN                PROT: rw | ro | none
//! mprotect AT LEN PROT
//! madvise AT LEN ADVICE        ADVICE: dontneed | free | pageout
//! mremap AT OLD NEW [maymove] [fixed=TO]
//! fork                         (the child gets its own notifier subscriber)
//! write AT | child write AT    (an 8-byte write, as the process would do it)
//! clear-refs | child clear-refs    (soft-dirty reset)
//! child exit
//! ```
//!
//! `#` starts a comment. The memfds (`N` below [`MEMFDS`]) exist from the start, each
//! [`MEMFD_PAGES`] pages long; `OFF` is the page offset in the file.

use std::fmt;

/// Memfds every script has.
pub const MEMFDS: u32 = 2;
/// Size of each memfd, in pages.
pub const MEMFD_PAGES: u64 = 64;

/// Access of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    /// `PROT_READ | PROT_WRITE`.
    Rw,
    /// `PROT_READ`.
    Ro,
    /// `PROT_NONE`.
    None,
}

/// What a mapping maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    Anon,
    /// `MAP_SHARED | MAP_ANONYMOUS`.
    Shm,
    /// Memfd `id` from page `off`, `MAP_SHARED` or `MAP_PRIVATE`.
    Memfd {
        /// Which memfd.
        id: u32,
        /// Page offset in it.
        off: u64,
        /// `MAP_SHARED`.
        shared: bool,
    },
}

/// An `madvise` advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`.
    DontNeed,
    /// `MADV_FREE`.
    Free,
    /// `MADV_PAGEOUT` (reclaim now).
    PageOut,
}

/// Which process does it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Who {
    /// The script's process.
    Parent,
    /// Its forked child.
    Child,
}

/// One operation (addresses and lengths in pages from the base).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `mmap(MAP_FIXED)`.
    Mmap {
        /// First page.
        at: u64,
        /// Pages.
        len: u64,
        /// What it maps.
        kind: Kind,
        /// Access.
        prot: Prot,
    },
    /// `munmap`.
    Munmap {
        /// First page.
        at: u64,
        /// Pages.
        len: u64,
    },
    /// `mprotect`.
    Mprotect {
        /// First page.
        at: u64,
        /// Pages.
        len: u64,
        /// New access.
        prot: Prot,
    },
    /// `madvise`.
    Madvise {
        /// First page.
        at: u64,
        /// Pages.
        len: u64,
        /// Advice.
        advice: Advice,
    },
    /// `mremap`.
    Mremap {
        /// Old first page.
        at: u64,
        /// Old length in pages.
        old: u64,
        /// New length in pages.
        new: u64,
        /// `MREMAP_MAYMOVE`.
        may_move: bool,
        /// `MREMAP_FIXED` target (implies `may_move`).
        fixed: Option<u64>,
    },
    /// `fork` (at most one child at a time).
    Fork,
    /// An 8-byte write to the page.
    Write {
        /// Who writes.
        who: Who,
        /// The page.
        at: u64,
    },
    /// `echo 4 > /proc/self/clear_refs`.
    ClearRefs {
        /// Whose.
        who: Who,
    },
    /// The child exits.
    ChildExit,
}

impl fmt::Display for Prot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prot::Rw => "rw",
            Prot::Ro => "ro",
            Prot::None => "none",
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Anon => f.write_str("anon"),
            Kind::Shm => f.write_str("shm"),
            Kind::Memfd { id, off, shared } => {
                let s = if *shared { "shared" } else { "private" };
                write!(f, "memfd-{s}:{id}:{off}")
            }
        }
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Advice::DontNeed => "dontneed",
            Advice::Free => "free",
            Advice::PageOut => "pageout",
        })
    }
}

fn child(who: Who) -> &'static str {
    match who {
        Who::Parent => "",
        Who::Child => "child ",
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Mmap {
                at,
                len,
                kind,
                prot,
            } => write!(f, "mmap {at} {len} {kind} {prot}"),
            Op::Munmap { at, len } => write!(f, "munmap {at} {len}"),
            Op::Mprotect { at, len, prot } => write!(f, "mprotect {at} {len} {prot}"),
            Op::Madvise { at, len, advice } => write!(f, "madvise {at} {len} {advice}"),
            Op::Mremap {
                at,
                old,
                new,
                may_move,
                fixed,
            } => {
                write!(f, "mremap {at} {old} {new}")?;
                if *may_move {
                    f.write_str(" maymove")?;
                }
                if let Some(to) = fixed {
                    write!(f, " fixed={to}")?;
                }
                Ok(())
            }
            Op::Fork => f.write_str("fork"),
            Op::Write { who, at } => write!(f, "{}write {at}", child(*who)),
            Op::ClearRefs { who } => write!(f, "{}clear-refs", child(*who)),
            Op::ChildExit => f.write_str("child exit"),
        }
    }
}

/// A script that does not parse: the line number (from 1) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

fn num(t: Option<&str>, what: &str) -> Result<u64, String> {
    let t = t.ok_or_else(|| format!("missing {what}"))?;
    t.parse().map_err(|_| format!("bad {what} {t:?}"))
}

fn prot(t: Option<&str>) -> Result<Prot, String> {
    match t {
        Some("rw") => Ok(Prot::Rw),
        Some("ro") => Ok(Prot::Ro),
        Some("none") => Ok(Prot::None),
        other => Err(format!("bad protection {other:?} (rw, ro, none)")),
    }
}

fn kind(t: Option<&str>) -> Result<Kind, String> {
    let t = t.ok_or("missing kind")?;
    match t {
        "anon" => return Ok(Kind::Anon),
        "shm" => return Ok(Kind::Shm),
        _ => {}
    }
    let mut parts = t.split(':');
    let shared = match parts.next() {
        Some("memfd-shared") => true,
        Some("memfd-private") => false,
        _ => return Err(format!("bad kind {t:?}")),
    };
    let id = num(parts.next(), "memfd number")?;
    let off = num(parts.next(), "memfd offset")?;
    if id >= u64::from(MEMFDS) || parts.next().is_some() {
        return Err(format!(
            "bad memfd {t:?} (memfd-shared:N:OFF, N < {MEMFDS})"
        ));
    }
    Ok(Kind::Memfd {
        id: id as u32,
        off,
        shared,
    })
}

/// Largest page number or length a script may use (keeps every address inside the
/// region).
pub const MAX_PAGES: u64 = 1 << 20;

fn parse_line(line: &str) -> Result<Option<Op>, String> {
    let line = line.split('#').next().unwrap_or("").trim();
    if line.is_empty() {
        return Ok(None);
    }
    let mut t = line.split_whitespace();
    let mut word = t.next().expect("non-empty");
    let mut who = Who::Parent;
    if word == "child" {
        who = Who::Child;
        word = t.next().ok_or("child what?")?;
    }
    let page = |v: u64| {
        if v > MAX_PAGES {
            Err(format!("{v} is beyond {MAX_PAGES} pages"))
        } else {
            Ok(v)
        }
    };
    let op = match (who, word) {
        (Who::Parent, "mmap") => Op::Mmap {
            at: page(num(t.next(), "address")?)?,
            len: page(num(t.next(), "length")?)?,
            kind: kind(t.next())?,
            prot: prot(t.next())?,
        },
        (Who::Parent, "munmap") => Op::Munmap {
            at: page(num(t.next(), "address")?)?,
            len: page(num(t.next(), "length")?)?,
        },
        (Who::Parent, "mprotect") => Op::Mprotect {
            at: page(num(t.next(), "address")?)?,
            len: page(num(t.next(), "length")?)?,
            prot: prot(t.next())?,
        },
        (Who::Parent, "madvise") => Op::Madvise {
            at: page(num(t.next(), "address")?)?,
            len: page(num(t.next(), "length")?)?,
            advice: match t.next() {
                Some("dontneed") => Advice::DontNeed,
                Some("free") => Advice::Free,
                Some("pageout") => Advice::PageOut,
                other => return Err(format!("bad advice {other:?}")),
            },
        },
        (Who::Parent, "mremap") => {
            let at = page(num(t.next(), "address")?)?;
            let old = page(num(t.next(), "old length")?)?;
            let new = page(num(t.next(), "new length")?)?;
            let (mut may_move, mut fixed) = (false, None);
            for w in t.by_ref() {
                match w.strip_prefix("fixed=") {
                    Some(v) => fixed = Some(page(num(Some(v), "target")?)?),
                    None if w == "maymove" => may_move = true,
                    None => return Err(format!("bad mremap flag {w:?}")),
                }
            }
            Op::Mremap {
                at,
                old,
                new,
                may_move,
                fixed,
            }
        }
        (Who::Parent, "fork") => Op::Fork,
        (_, "write") => Op::Write {
            who,
            at: page(num(t.next(), "address")?)?,
        },
        (_, "clear-refs") => Op::ClearRefs { who },
        (Who::Child, "exit") => Op::ChildExit,
        _ => return Err(format!("unknown operation {line:?}")),
    };
    if let Some(extra) = t.next() {
        return Err(format!("unexpected {extra:?}"));
    }
    Ok(Some(op))
}

/// Parses a script. Besides syntax, checks that child operations have a child and
/// `fork` has none yet.
pub fn parse(text: &str) -> Result<Vec<Op>, ParseError> {
    let mut ops = Vec::new();
    let mut has_child = false;
    for (n, line) in text.lines().enumerate() {
        let err = |reason: String| ParseError {
            line: n + 1,
            reason,
        };
        let Some(op) = parse_line(line).map_err(err)? else {
            continue;
        };
        let needs_child = matches!(
            op,
            Op::Write {
                who: Who::Child,
                ..
            } | Op::ClearRefs { who: Who::Child }
                | Op::ChildExit
        );
        if needs_child && !has_child {
            return Err(err("no child (fork first)".into()));
        }
        match op {
            Op::Fork if has_child => return Err(err("one child at a time".into())),
            Op::Fork => has_child = true,
            Op::ChildExit => has_child = false,
            _ => {}
        }
        ops.push(op);
    }
    Ok(ops)
}

/// Formats a script in the text form [`parse`] reads.
pub fn format(ops: &[Op]) -> String {
    ops.iter().map(|o| format!("{o}\n")).collect()
}

/// A small deterministic generator (SplitMix64): the same seed gives the same script
/// on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Pages the random scripts use: two 2 MiB page tables' worth, so some operations
/// cross a table boundary.
pub const SPAN: u64 = 1024;

/// A random script of `n` operations from `seed`, covering every operation of the
/// format. Addresses cluster on a few spots so operations meet each other's mappings.
pub fn random(seed: u64, n: usize) -> Vec<Op> {
    let mut r = Rng::new(seed);
    let mut ops = Vec::with_capacity(n);
    let mut has_child = false;
    // A few hot spots, some near the 2 MiB table boundary at page 512.
    let spots = [0, 16, 40, 64, 500, 508, 520, 700];
    let addr = |r: &mut Rng| {
        let s = spots[r.below(spots.len() as u64) as usize];
        (s + r.below(24)).min(SPAN - 1)
    };
    let len = |r: &mut Rng| match r.below(4) {
        0 => 1,
        1 => 1 + r.below(4),
        2 => 1 + r.below(16),
        _ => 4 + r.below(40),
    };
    let prot = |r: &mut Rng| match r.below(6) {
        0..=2 => Prot::Rw,
        3 | 4 => Prot::Ro,
        _ => Prot::None,
    };
    while ops.len() < n {
        let op = match r.below(100) {
            0..=19 => {
                let kind = match r.below(6) {
                    0..=2 => Kind::Anon,
                    3 => Kind::Shm,
                    k => Kind::Memfd {
                        id: r.below(u64::from(MEMFDS)) as u32,
                        off: r.below(MEMFD_PAGES / 2),
                        shared: k == 4,
                    },
                };
                Op::Mmap {
                    at: addr(&mut r),
                    len: len(&mut r),
                    kind,
                    prot: prot(&mut r),
                }
            }
            20..=24 => Op::Munmap {
                at: addr(&mut r),
                len: len(&mut r),
            },
            25..=34 => Op::Mprotect {
                at: addr(&mut r),
                len: len(&mut r),
                prot: prot(&mut r),
            },
            35..=46 => Op::Madvise {
                at: addr(&mut r),
                len: len(&mut r),
                advice: match r.below(3) {
                    0 => Advice::DontNeed,
                    1 => Advice::Free,
                    _ => Advice::PageOut,
                },
            },
            47..=54 => {
                let at = addr(&mut r);
                let old = len(&mut r);
                match r.below(3) {
                    // Shrink, or grow in place.
                    0 => Op::Mremap {
                        at,
                        old,
                        new: len(&mut r),
                        may_move: false,
                        fixed: None,
                    },
                    // Move, same length (may span mappings).
                    1 => Op::Mremap {
                        at,
                        old,
                        new: old,
                        may_move: true,
                        fixed: Some(addr(&mut r)),
                    },
                    // Move and resize.
                    _ => Op::Mremap {
                        at,
                        old,
                        new: len(&mut r),
                        may_move: true,
                        fixed: Some(addr(&mut r)),
                    },
                }
            }
            55..=58 if !has_child => {
                has_child = true;
                Op::Fork
            }
            59..=60 if has_child => {
                has_child = false;
                Op::ChildExit
            }
            61..=62 => Op::ClearRefs {
                who: if has_child && r.below(2) == 0 {
                    Who::Child
                } else {
                    Who::Parent
                },
            },
            _ => Op::Write {
                who: if has_child && r.below(3) == 0 {
                    Who::Child
                } else {
                    Who::Parent
                },
                at: addr(&mut r),
            },
        };
        ops.push(op);
    }
    ops
}
