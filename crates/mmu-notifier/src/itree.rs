//! An interval tree over closed `u64` ranges: the index the interval subscribers live in
//! (the counterpart of Linux's `interval_tree`, an augmented red-black tree).
//!
//! # Structure
//!
//! [`IntervalTree`] is a red-black tree kept in an arena. Every entry owns one *slot*
//! index, `1..2^30`, into two parallel vectors:
//!
//! - `nodes`, 40 bytes per entry: `start`, `last`, the subtree maximum `max` and the two
//!   child links (the fields every descent reads, first: a child link is a plain `u32`
//!   slot index, 0 being the empty link, so a descent loads it and uses it), then the
//!   `up` word and the slot's generation. The `up` word holds the parent's index in its
//!   low 30 bits and the node's color in its top bit (set: red); bit 30 is always clear.
//!   Removal and rebalancing climb through the parent links, and find a node's color in
//!   the word they read anyway to climb.
//! - `values`: `Some(value)` while the slot is occupied.
//!
//! Freed slots are chained into a free list (through the dead node's left link) and reused
//! with their generation bumped, so a [`NodeKey`] — slot index plus generation — is a
//! stable handle that keeps working while other entries come and go, and that is reliably
//! refused once its own entry has been removed. Each tree starts its generations at a
//! different base, so a key from another tree is almost always refused as well.
//!
//! Index 0 is a sentinel node (all zero: black, maximum 0) that is never linked into the
//! tree, so an empty link reads as a black subtree whose maximum is 0, and maxima and
//! colors are read without checking for empty links.
//!
//! Insertion walks down from the root (one comparison and one conditional store per
//! level), hangs the new entry as a red leaf and repairs upwards through the parent links
//! (recoloring, then at most two rotations). Removal starts at the entry itself, so it
//! never searches: it unlinks it (or its successor, which takes its place), recomputes
//! maxima upwards until one does not change, and then, if a black node left, recolors
//! upwards and rotates at most three times. Both are O(log n); the rebalancing after
//! either is O(1) amortized, as in Linux. A red-black tree of fewer than 2^30 nodes is at
//! most 60 levels tall, so the iterator's stack is a small array and nothing recurses.
//!
//! # Slot indices
//!
//! The hot paths read nodes without bounds checks. That is sound because of one
//! invariant: every index the tree stores (in a link, a parent field, `root` or the free
//! list) or passes between its own functions is either the empty link 0 while the
//! sentinel exists, or a slot that was pushed; `nodes` and `values` only ever grow, and
//! always together, so they have the same length. A slot enters the tree only after
//! `alloc` pushed it (the sentinel first), and keys from callers are checked against
//! `nodes.len()` and the slot's generation before they are used. Debug builds assert the
//! bound on every access.
//!
//! `alloc` appends a slot by writing both vectors' next element in place, without
//! `push`'s capacity check. That is sound because the tree keeps `room`, the number of
//! slots both vectors have allocated (never more than 2^30, so that indices fit their 30
//! bits): `grow` sets it from the capacities it obtained, `clone` from the clone's own,
//! and an insertion grows the storage first whenever `len == room`.
//!
//! Queries also hand out references to the values of the nodes they visit without
//! checking that the slot is occupied, because every node reachable from `root` holds its
//! value: `alloc` stores the value before the node is linked, and `remove` takes it out
//! in the same `&mut self` call that unlinks the node. `check_invariants` verifies this.
//!
//! # Order and augmentation invariants
//!
//! - **Order.** An in-order walk visits entries ascending by `start`; entries with equal
//!   starts in the order they were inserted (an insertion goes right of an equal start,
//!   and rotations and removals keep the in-order sequence), so duplicate intervals are
//!   distinct, totally ordered entries.
//! - **Color.** The root is black, no red node has a red child, and every path from a
//!   node down to an empty link passes the same number of black nodes (so the longest
//!   path is at most twice the shortest).
//! - **Augmentation.** Every node's `max` is the largest `last` in its subtree:
//!   `max(n) = max(last(n), max(left(n)), max(right(n)))` — Linux's `__subtree_last`.
//!   Insertion raises `max` on its way down; a rotation hands the old subtree root's `max`
//!   to the new subtree root (same set of entries) and recomputes the demoted node's;
//!   removal recomputes `max` from the lowest node whose subtree lost an entry upwards and
//!   stops at the first node whose `max` comes out unchanged (the subtrees above it lost
//!   an entry that was not their maximum, or that an equal `last` still provides), before
//!   any removal rotation.
//!
//! The augmentation lets an overlap query for `[qs, ql]` skip every subtree whose `max` is
//! below `qs` (nothing in it ends late enough) and stop at the first node, in order, whose
//! `start` is above `ql` (nothing from there on starts early enough), which makes the
//! query O(log n + k) for k results in practice, and [`IntervalTree::overlaps_any`]
//! O(log n).

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// The empty link, and the index of the all-zero sentinel node.
const NIL: u32 = 0;
/// The bits of a node's `up` word that hold the parent's slot index (slot indices are
/// below 2^30).
const IDX_MASK: u32 = 0x3FFF_FFFF;
/// The bit of a node's `up` word that says it is red (clear: black, as the all-zero
/// sentinel and free slots are).
const RED: u32 = 1 << 31;
/// The most slots a tree has (the sentinel and 2^30 - 1 entries): every slot index fits
/// in [`IDX_MASK`].
const MAX_SLOTS: usize = IDX_MASK as usize + 1;
/// Room for any root-to-leaf path: a red-black tree of fewer than 2^30 nodes is at most
/// 2 log2(2^30) = 60 levels tall.
const MAX_HEIGHT: usize = 64;

/// The rebalancing cases, counted in unit-test builds (and nowhere else) so that a test
/// can show that its workload reaches every one of them.
#[cfg(test)]
mod cases {
    use std::cell::Cell;

    pub const INS_RED_UNCLE: usize = 0;
    pub const INS_RED_UNCLE_ROOT: usize = 1;
    pub const INS_INNER: usize = 2;
    pub const INS_OUTER: usize = 3;
    pub const RM_LEAF_RED: usize = 4;
    pub const RM_LEAF_BLACK: usize = 5;
    pub const RM_ONE_CHILD: usize = 6;
    pub const RM_SUCC_IS_RIGHT: usize = 7;
    pub const RM_SUCC_DEEP: usize = 8;
    pub const RM_SUCC_HAS_CHILD: usize = 9;
    pub const FIX_RED_SIBLING: usize = 10;
    pub const FIX_RED_PARENT_ABSORBS: usize = 11;
    pub const FIX_CLIMB: usize = 12;
    pub const FIX_AT_ROOT: usize = 13;
    pub const FIX_NEAR_NEPHEW: usize = 14;
    pub const FIX_FAR_NEPHEW: usize = 15;
    pub const PROPAGATE_STOPS_EARLY: usize = 16;
    pub const PROPAGATE_MAX_ELSEWHERE: usize = 17;
    pub const COUNT: usize = 18;

    thread_local! {
        pub static HITS: Cell<[u64; COUNT]> = const { Cell::new([0; COUNT]) };
    }

    pub fn hit(case: usize) {
        HITS.with(|h| {
            let mut v = h.get();
            v[case] += 1;
            h.set(v);
        });
    }
}

/// Counts a rebalancing case in unit-test builds; nothing otherwise.
macro_rules! case {
    ($c:ident) => {
        #[cfg(test)]
        cases::hit(cases::$c);
    };
}

/// Where each new tree's generations start (spread by the golden-ratio increment), so
/// that keys of different trees rarely coincide.
static GENERATION_BASE: AtomicU32 = AtomicU32::new(0);

/// Stable handle to an entry of an [`IntervalTree`].
///
/// A key stays valid until its entry is removed; after that the tree refuses it (its slot
/// may hold a new entry, but with a different generation). Generations are 32 bits, so a
/// key could only be confused with a later entry after 2^32 reuses of the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey {
    index: u32,
    generation: u32,
}

impl NodeKey {
    /// The key packed into a `u64` (slot index in the high half, generation in the low
    /// half), e.g. to keep it in an atomic. The top bit is always clear (slot indices are
    /// below 2^30), so values from 2^63 up are free for a caller's own sentinels.
    pub fn to_bits(self) -> u64 {
        (self.index as u64) << 32 | self.generation as u64
    }

    /// The key [`to_bits`](Self::to_bits) packed. Any `u64` is accepted: one that no tree
    /// handed out is simply a key that every tree refuses (or, by a 2^-32 chance, one that
    /// names some other entry of a tree).
    pub fn from_bits(bits: u64) -> Self {
        Self {
            index: (bits >> 32) as u32,
            generation: bits as u32,
        }
    }
}

/// The error [`IntervalTree::insert`] returns for an interval whose `start` is after its
/// `last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid interval: start {start:#x} is after last {last:#x}")]
pub struct InvalidInterval {
    /// The `start` that was passed.
    pub start: u64,
    /// The `last` that was passed.
    pub last: u64,
}

/// One entry's place in the tree. The fields a descent reads come first.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Node {
    start: u64,
    last: u64,
    /// The largest `last` in this node's subtree.
    max: u64,
    /// Left and right child indices ([`NIL`] for none); for a free slot, `link[0]` is the
    /// next free slot.
    link: [u32; 2],
    /// The parent's index ([`NIL`] for the root) in the low 30 bits, and [`RED`] for a
    /// red node. Meaningless in a free slot.
    up: u32,
    /// The generation of the entry in this slot, or of the next one if it is free.
    gen: u32,
}

impl Node {
    /// A new entry's node before it is linked in: no children, no parent, black (the
    /// insertion colors it).
    #[inline(always)]
    fn unlinked(start: u64, last: u64, gen: u32) -> Node {
        Node {
            start,
            last,
            max: last,
            link: [NIL; 2],
            up: NIL,
            gen,
        }
    }

    #[inline(always)]
    fn child(&self, d: usize) -> u32 {
        self.link[d]
    }

    #[inline(always)]
    fn parent(&self) -> u32 {
        self.up & IDX_MASK
    }

    /// Replaces the parent link, keeping the balance.
    #[inline(always)]
    fn set_parent(&mut self, p: u32) {
        self.up = (self.up & !IDX_MASK) | p;
    }

    #[inline(always)]
    fn is_red(&self) -> bool {
        self.up & RED != 0
    }

    #[inline(always)]
    fn set_black(&mut self) {
        self.up &= !RED;
    }

    #[inline(always)]
    fn set_red(&mut self) {
        self.up |= RED;
    }

    /// Replaces the child on side `d`.
    #[inline(always)]
    fn set_child(&mut self, d: usize, c: u32) {
        self.link[d] = c;
    }

    /// The side `c` hangs on (`c` must be a child).
    #[inline(always)]
    fn side_of(&self, c: u32) -> usize {
        (self.link[0] != c) as usize
    }
}

/// A set of closed intervals `[start, last]` over `u64`, each with a value, that finds
/// every interval overlapping a query range in O(log n + k).
///
/// Duplicate intervals are allowed: every [`insert`](Self::insert) makes a new entry with
/// its own [`NodeKey`]. See the [module documentation](self) for the structure.
///
/// ```
/// use mmu_notifier::itree::IntervalTree;
///
/// let mut t = IntervalTree::new();
/// let a = t.insert(0x1000, 0x1fff, "a")?;
/// let _b = t.insert(0x3000, 0x4fff, "b")?;
/// let mut hits = Vec::new();
/// t.for_each_overlap(0x1800, 0x3000, |_, s, l, v| hits.push((s, l, *v)));
/// assert_eq!(hits, [(0x1000, 0x1fff, "a"), (0x3000, 0x4fff, "b")]);
/// assert_eq!(t.remove(a), Some("a"));
/// assert_eq!(t.remove(a), None);
/// assert!(!t.overlaps_any(0, 0x2fff));
/// # Ok::<(), mmu_notifier::itree::InvalidInterval>(())
/// ```
pub struct IntervalTree<V> {
    /// The entries' nodes; index 0 is the sentinel (pushed with the first entry).
    nodes: Vec<Node>,
    /// Values, parallel to `nodes`; `None` for free slots and the sentinel.
    values: Vec<Option<V>>,
    /// How many slots the vectors may hold without growing: their capacity, but never
    /// more than [`MAX_SLOTS`]. An insertion that finds `len == room` grows them, or
    /// panics if the tree is full.
    room: usize,
    root: u32,
    /// Head of the free-slot list, [`NIL`] when empty.
    free: u32,
    len: usize,
    /// The generation of a slot's first entry.
    gen_base: u32,
}

impl<V: Clone> Clone for IntervalTree<V> {
    fn clone(&self) -> Self {
        let mut t = Self {
            nodes: self.nodes.clone(),
            values: self.values.clone(),
            room: 0,
            root: self.root,
            free: self.free,
            len: self.len,
            gen_base: self.gen_base,
        };
        // The clone's capacities need not be the original's.
        t.room = t.allocated();
        t
    }
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: fmt::Debug> fmt::Debug for IntervalTree<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(_, s, l, v)| (s..=l, v)))
            .finish()
    }
}

impl<V> IntervalTree<V> {
    /// An empty tree. Allocates nothing until the first insertion.
    pub fn new() -> Self {
        Self {
            nodes: Vec::new(),
            values: Vec::new(),
            room: 0,
            root: NIL,
            free: NIL,
            len: 0,
            gen_base: GENERATION_BASE.fetch_add(0x9E37_79B9, Ordering::Relaxed),
        }
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Approximate heap bytes one entry takes beyond its value: its 40-byte node. (The
    /// value is kept as an `Option<V>`, which costs nothing more for types with a niche
    /// such as `Arc`, `Box` or references, and up to `align_of::<V>()` bytes otherwise;
    /// vector growth slack is not counted.)
    pub fn bytes_per_entry() -> usize {
        std::mem::size_of::<Node>()
    }

    /// Inserts the closed interval `[start, last]` with `value`, and returns the new
    /// entry's key. O(log n).
    ///
    /// An interval equal to an existing one makes a second, distinct entry.
    ///
    /// # Errors
    ///
    /// [`InvalidInterval`] if `start > last`; the tree is then unchanged.
    ///
    /// # Panics
    ///
    /// If the tree already holds 2^30 − 1 entries (about 43 GB of nodes).
    #[inline]
    pub fn insert(&mut self, start: u64, last: u64, value: V) -> Result<NodeKey, InvalidInterval> {
        if start > last {
            return Err(InvalidInterval { start, last });
        }
        // (The check above is inlined into the caller, so the key comes back in a
        // register rather than through a `Result` in memory.)
        Ok(self.insert_valid(start, last, value))
    }

    /// [`insert`](Self::insert) of a valid interval (`start <= last`).
    fn insert_valid(&mut self, start: u64, last: u64, value: V) -> NodeKey {
        let (idx, generation) = self.alloc(start, last, value);
        self.len += 1;
        let key = NodeKey {
            index: idx,
            generation,
        };
        let n = self.root;
        if n == NIL {
            self.root = idx;
            return key;
        }
        // Down to a leaf position, raising maxima on the way. An equal start goes right:
        // after the entries already there.
        // The slice keeps the base pointer in a register across the stores; the loop
        // carries only the node's address (its index is recovered once, at the end).
        let nodes = &mut self.nodes[..];
        let base = nodes.as_ptr() as usize;
        debug_assert!((n as usize) < nodes.len());
        // SAFETY: the root is in bounds (see "Slot indices").
        let mut node = unsafe { nodes.get_unchecked_mut(n as usize) };
        let parent_red = loop {
            if node.max < last {
                node.max = last;
            }
            let c = if start < node.start {
                let c = node.link[0];
                if c == NIL {
                    node.link[0] = idx;
                    break node.is_red();
                }
                c
            } else {
                let c = node.link[1];
                if c == NIL {
                    node.link[1] = idx;
                    break node.is_red();
                }
                c
            };
            debug_assert!((c as usize) < nodes.len());
            // SAFETY: c is a child link: in bounds (see "Slot indices").
            node = unsafe { nodes.get_unchecked_mut(c as usize) };
        };
        let n = ((node as *mut Node as usize - base) / std::mem::size_of::<Node>()) as u32;
        // The new node is red; if its parent is red too, repair that.
        self.nd_mut(idx).up = RED | n;
        if parent_red {
            self.insert_fixup(idx, n);
        }
        key
    }

    /// Removes the entry `key` names and returns its value, or `None` if the key is stale
    /// (its entry was already removed) or does not belong to this tree. O(log n).
    pub fn remove(&mut self, key: NodeKey) -> Option<V> {
        let z = key.index;
        match self.nodes.get(z as usize) {
            Some(m) if m.gen == key.generation => {}
            _ => return None,
        }
        debug_assert_eq!(self.values.len(), self.nodes.len());
        // SAFETY: z < nodes.len() (checked just above), and `values` has the same length.
        // (The sentinel's value is always `None`, so it is refused here.)
        let value = unsafe { self.values.get_unchecked_mut(z as usize) }.take()?;
        // (Only the words needed now are kept in registers; `max` and `last` are read
        // again where they are used: the node is not rewritten before that.)
        let (zup, [zl, zr]) = (self.nd(z).up, self.nd(z).link);
        let zp = zup & IDX_MASK;

        // Unlink z. `fix` is where maxima start to be stale (the lowest node whose
        // subtree lost z); `db` is the parent of a position whose paths lost one black
        // node (NIL if none did).
        let (fix, db);
        if zl == NIL || zr == NIL {
            // At most one child: it takes z's place. A lone child is a red leaf (the black
            // heights of z's two sides are equal) and turns black, taking z's place and
            // color word; without a child, a black z leaves its parent one black short.
            let c = zl | zr;
            self.hook(zp, z, c);
            if c != NIL {
                case!(RM_ONE_CHILD);
                self.nd_mut(c).up = zp;
                db = NIL;
            } else if zup & RED != 0 {
                case!(RM_LEAF_RED);
                db = NIL;
            } else {
                case!(RM_LEAF_BLACK);
                db = zp;
            }
            fix = zp;
        } else {
            // Two children: the successor s (leftmost of the right subtree) leaves its
            // place to its right child c2 (at most a red leaf) and takes z's place, links
            // and color.
            let (mut sp, mut s) = (z, zr);
            loop {
                let l = self.nd(s).child(0);
                if l == NIL {
                    break;
                }
                (sp, s) = (s, l);
            }
            let zmax = self.nd(z).max;
            let sn = *self.nd(s);
            let c2 = sn.child(1);
            let mut link = [zl, zr];
            if s == zr {
                // s keeps its right subtree.
                case!(RM_SUCC_IS_RIGHT);
                link[1] = c2;
                sp = s;
            } else {
                case!(RM_SUCC_DEEP);
                self.nd_mut(sp).set_child(0, c2);
                self.nd_mut(zr).set_parent(s);
            }
            {
                let sm = self.nd_mut(s);
                sm.link = link;
                sm.up = zup;
                // Same entries as z's subtree had, but z: recomputed below.
                sm.max = zmax;
            }
            self.nd_mut(zl).set_parent(s);
            self.hook(zp, z, s);
            if c2 != NIL {
                // A red leaf: it turns black in s's old place.
                case!(RM_SUCC_HAS_CHILD);
                self.nd_mut(c2).up = sp;
                db = NIL;
            } else {
                db = if sn.up & RED != 0 { NIL } else { sp };
            }
            if sp != s {
                // The nodes from s's old parent up to (not including) s lost s.
                self.propagate(sp, s, sn.last);
            }
            fix = s;
        }
        // Free z's slot. Its other fields are never read again (nothing links to it, and
        // `alloc` rewrites the node): only the free-list link and the next generation
        // matter.
        self.len -= 1;
        let free = self.free;
        let zm = self.nd_mut(z);
        let zlast = zm.last;
        zm.link[0] = free;
        zm.gen = key.generation.wrapping_add(1);
        self.free = z;

        // Maxima first (rotations keep them), then the colors.
        self.propagate(fix, NIL, zlast);
        if db != NIL {
            self.remove_fixup(db);
        }
        Some(value)
    }

    /// The interval and value of the entry `key` names, or `None` for a stale or foreign
    /// key. O(1).
    pub fn get(&self, key: NodeKey) -> Option<(u64, u64, &V)> {
        match self.nodes.get(key.index as usize) {
            Some(m) if m.gen == key.generation => {
                let value = self.values[key.index as usize].as_ref()?;
                let n = &self.nodes[key.index as usize];
                Some((n.start, n.last, value))
            }
            _ => None,
        }
    }

    /// The value of the entry `key` names, mutably, or `None` for a stale or foreign key.
    /// O(1). (The interval itself cannot change: remove and insert again.)
    pub fn get_mut(&mut self, key: NodeKey) -> Option<&mut V> {
        match self.nodes.get(key.index as usize) {
            Some(m) if m.gen == key.generation => self.values[key.index as usize].as_mut(),
            _ => None,
        }
    }

    /// Calls `f(key, start, last, value)` for every entry that overlaps the closed range
    /// `[start, last]` (shares at least one point with it), ascending by start; entries
    /// with equal starts come in the order they were inserted. O(log n + k) for k results.
    ///
    /// A query with `start > last` is empty and matches nothing.
    pub fn for_each_overlap(
        &self,
        start: u64,
        last: u64,
        mut f: impl FnMut(NodeKey, u64, u64, &V),
    ) {
        if start > last || self.root == NIL || self.nd(self.root).max < start {
            return;
        }
        if start == 0 {
            return self.for_each_from_zero(last, f);
        }
        // An in-order walk that skips subtrees whose max is below `start` and stops at
        // the first node that starts after `last`; it moves on to the next node in order
        // through the parent links (no stack). As `start > 0`, the sentinel (max 0) fails
        // every `max >= start` test: empty links need no check.
        let mut n = self.root;
        'descend: loop {
            // Invariant: n's subtree has an entry that ends at or after `start`.
            loop {
                let node = self.nd(n);
                let l = node.child(0);
                if self.nd(l).max >= start {
                    // The leftmost candidate is on the left: n comes after it.
                    n = l;
                    continue;
                }
                if node.start > last {
                    // n and everything after it in order start after the query.
                    return;
                }
                let r = node.child(1);
                if node.last >= start {
                    let (key, value) = self.entry(n);
                    f(key, node.start, node.last, value);
                    if self.nd(r).max < start {
                        break;
                    }
                }
                // (If n itself ends before `start`, the invariant puts the entry that ends
                // at or after it on the right, as Linux's search assumes too: no check.)
                n = r;
            }
            // Climb to the next node in order (the first ancestor whose left subtree n's
            // subtree is in) and go on from there.
            loop {
                let p = self.nd(n).parent();
                if p == NIL {
                    return;
                }
                let from_right = self.nd(p).child(1) == n;
                n = p;
                if from_right {
                    continue;
                }
                let node = self.nd(n);
                if node.start > last {
                    return;
                }
                if node.last >= start {
                    let (key, value) = self.entry(n);
                    f(key, node.start, node.last, value);
                }
                let r = node.child(1);
                if self.nd(r).max >= start {
                    n = r;
                    continue 'descend;
                }
            }
        }
    }

    /// `for_each_overlap(0, last, f)`: every entry ends at or after 0, so the overlaps are
    /// the entries up to the first that starts after `last`. (Out of line: its iterator's
    /// stack would otherwise weigh on every query's prologue.)
    #[inline(never)]
    fn for_each_from_zero(&self, last: u64, mut f: impl FnMut(NodeKey, u64, u64, &V)) {
        for (key, s, l, value) in self.iter() {
            if s > last {
                return;
            }
            f(key, s, l, value);
        }
    }

    /// Whether any entry overlaps the closed range `[start, last]`. O(log n).
    ///
    /// A query with `start > last` is empty and overlaps nothing.
    pub fn overlaps_any(&self, start: u64, last: u64) -> bool {
        if start > last {
            return false;
        }
        let mut n = self.root;
        // If the left subtree has an entry ending at or after `start`, it holds an overlap
        // unless that entry starts after `last` — and then so does everything from this
        // node on. Otherwise nothing on the left can overlap, and neither this node nor
        // the right subtree can if this node starts after `last`.
        while n != NIL {
            let node = self.nd(n);
            if node.max < start {
                return false;
            }
            if (node.start <= last) & (node.last >= start) {
                return true;
            }
            let [l, r] = [node.child(0), node.child(1)];
            let go_left = (l != NIL) & (self.nd(l).max >= start);
            if !go_left & (node.start > last) {
                return false;
            }
            n = if go_left { l } else { r };
        }
        false
    }

    /// Every entry as `(key, start, last, value)`, ascending by start (equal starts in the
    /// same order as [`for_each_overlap`](Self::for_each_overlap)).
    pub fn iter(&self) -> impl Iterator<Item = (NodeKey, u64, u64, &V)> + '_ {
        Iter {
            tree: self,
            stack: [NIL; MAX_HEIGHT],
            sp: 0,
            next: self.root,
            remaining: self.len,
        }
    }

    /// Checks every structural invariant and panics with a description of the first one
    /// that is broken: order by `start`, the red-black coloring (black root, no red node
    /// with a red child, equal black heights), subtree maxima, parent links, a value in
    /// every node of the tree, `len`, the slots and the free list. O(n); for tests. (The
    /// order among equal starts, insertion order, is checked by the property tests.)
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        assert_eq!(
            self.nodes.len(),
            self.values.len(),
            "nodes and values differ in length"
        );
        let capacity = self.allocated();
        assert!(
            self.nodes.len() <= self.room && self.room <= capacity,
            "room {} outside [len {}, capacity {capacity}]",
            self.room,
            self.nodes.len()
        );
        if self.nodes.is_empty() {
            assert_eq!(self.root, NIL);
            assert_eq!(self.len, 0);
            return;
        }
        let s = &self.nodes[0];
        assert!(
            s.start == 0 && s.last == 0 && s.max == 0 && s.link == [0, 0] && s.up == 0,
            "sentinel modified: {s:?}"
        );
        assert!(self.values[0].is_none(), "sentinel slot occupied");
        assert_eq!(
            self.nodes[self.root as usize].parent(),
            NIL,
            "root has a parent"
        );
        assert!(!self.nodes[self.root as usize].is_red(), "the root is red");
        let mut seen = vec![false; self.nodes.len()];
        let mut prev: Option<(u64, u32)> = None;
        let (_, count) = self.check_subtree(self.root, &mut seen, &mut prev);
        assert_eq!(count, self.len, "reachable entries != len");
        let occupied = self.values.iter().filter(|v| v.is_some()).count();
        assert_eq!(occupied, self.len, "occupied slots != len");
        let mut f = self.free;
        let mut free = 0;
        while f != NIL {
            assert!(self.values[f as usize].is_none(), "free slot {f} occupied");
            assert!(!seen[f as usize], "free slot {f} is in the tree");
            seen[f as usize] = true;
            free += 1;
            assert!(free < self.nodes.len(), "free list cycles");
            f = self.nodes[f as usize].link[0];
        }
        assert_eq!(
            free + self.len + 1,
            self.nodes.len(),
            "slots leaked from the free list"
        );
    }

    /// Returns (black height, entry count) of the subtree at `n`, checking it.
    fn check_subtree(
        &self,
        n: u32,
        seen: &mut [bool],
        prev: &mut Option<(u64, u32)>,
    ) -> (u32, usize) {
        if n == NIL {
            return (0, 0);
        }
        assert!(!seen[n as usize], "node {n} reached twice");
        seen[n as usize] = true;
        assert!(
            self.values[n as usize].is_some(),
            "node {n} in the tree has a vacant slot"
        );
        let node = self.nodes[n as usize];
        assert!(node.start <= node.last, "node {n}: start > last");
        assert_eq!(
            node.up & !(RED | IDX_MASK),
            0,
            "node {n}: stray bit in up word"
        );
        for d in 0..2 {
            let c = node.child(d);
            if c != NIL {
                assert_eq!(
                    self.nodes[c as usize].parent(),
                    n,
                    "node {c}: wrong parent link"
                );
            }
        }
        let (hl, cl) = self.check_subtree(node.child(0), seen, prev);
        let key = (node.start, n);
        if let Some(p) = *prev {
            assert!(p.0 <= key.0, "order broken: {p:?} before {key:?}");
        }
        *prev = Some(key);
        let (hr, cr) = self.check_subtree(node.child(1), seen, prev);
        assert_eq!(
            hl, hr,
            "node {n}: black heights {hl} (left) and {hr} (right) differ"
        );
        if node.is_red() {
            for d in 0..2 {
                assert!(
                    !self.nodes[node.child(d) as usize].is_red(),
                    "red node {n} has a red child"
                );
            }
        }
        assert_eq!(node.max, self.compute_max(n), "node {n}: wrong subtree max");
        (hl + u32::from(!node.is_red()), 1 + cl + cr)
    }

    /// Takes a slot for a new, unlinked node; returns its index and generation.
    #[inline(always)]
    fn alloc(&mut self, start: u64, last: u64, value: V) -> (u32, u32) {
        let idx = self.free;
        if idx != NIL {
            let n = self.nd_mut(idx);
            let next = n.link[0];
            let gen = n.gen;
            *n = Node::unlinked(start, last, gen);
            self.free = next;
            self.values[idx as usize] = Some(value);
            return (idx, gen);
        }
        let mut idx = self.nodes.len();
        if idx == self.room {
            self.grow();
            // (`grow` pushed the sentinel if this is the first entry.)
            idx = self.nodes.len();
        }
        let gen = self.gen_base;
        debug_assert!(idx < self.room);
        debug_assert!(self.room <= self.allocated());
        // SAFETY: idx = len < room <= both capacities (both vectors always have the same
        // length): the slot is allocated and unused in both, and is written before their
        // lengths count it.
        unsafe {
            self.nodes
                .as_mut_ptr()
                .add(idx)
                .write(Node::unlinked(start, last, gen));
            self.values.as_mut_ptr().add(idx).write(Some(value));
            self.nodes.set_len(idx + 1);
            self.values.set_len(idx + 1);
        }
        // (idx < room <= 2^30.)
        (idx as u32, gen)
    }

    /// Slots both vectors have allocated, at most [`MAX_SLOTS`]: what `room` is set to.
    fn allocated(&self) -> usize {
        self.nodes
            .capacity()
            .min(self.values.capacity())
            .min(MAX_SLOTS)
    }

    /// Grows the room of both vectors, out of the insertion path: to 16 slots first, then
    /// four times larger up to 1024 slots (fewer reallocations, each copying the whole
    /// storage, while the slack stays a few tens of kilobytes at most), then twice larger,
    /// never beyond [`MAX_SLOTS`]. The first time, it pushes the sentinel too.
    ///
    /// # Panics
    ///
    /// If the tree holds 2^30 - 1 entries (every slot index is taken).
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let len = self.nodes.len();
        assert!(len < MAX_SLOTS, "IntervalTree is full (2^30 - 1 entries)");
        let more = if len < 1024 { 3 * len } else { len };
        let more = more.max(16).min(MAX_SLOTS - len);
        self.nodes.reserve_exact(more);
        self.values.reserve_exact(more);
        self.room = self.allocated();
        if len == 0 {
            self.nodes.push(Node::default());
            self.values.push(None);
        }
    }

    /// The key and value of an entry in the tree.
    #[inline]
    fn entry(&self, n: u32) -> (NodeKey, &V) {
        let key = NodeKey {
            index: n,
            generation: self.nd(n).gen,
        };
        debug_assert_eq!(self.values.len(), self.nodes.len());
        // SAFETY: `n` is in bounds of `nodes` (as in `nd`), and `values` always has the
        // same length: the two are only ever pushed together.
        let slot = unsafe { self.values.get_unchecked(n as usize) };
        debug_assert!(slot.is_some(), "node {n} in the tree has a vacant slot");
        // SAFETY: a node in the tree holds its value (see "Slot indices"), so the
        // reference is formed without reading the slot: a caller that does not look at
        // the value never touches its memory.
        let value = unsafe { slot.as_ref().unwrap_unchecked() };
        (key, value)
    }

    /// Node `i`, without a bounds check.
    #[inline(always)]
    fn nd(&self, i: u32) -> &Node {
        debug_assert!((i as usize) < self.nodes.len(), "slot {i} out of range");
        // SAFETY: `i` is in bounds by the slot-index invariant (see "Slot indices" in the
        // module documentation): every index the tree stores or passes to this is NIL (and
        // the sentinel exists) or a pushed slot, and `nodes` never shrinks.
        unsafe { self.nodes.get_unchecked(i as usize) }
    }

    /// Node `i`, mutably, without a bounds check.
    #[inline(always)]
    fn nd_mut(&mut self, i: u32) -> &mut Node {
        debug_assert!((i as usize) < self.nodes.len(), "slot {i} out of range");
        // SAFETY: as in `nd`.
        unsafe { self.nodes.get_unchecked_mut(i as usize) }
    }

    /// `max(last, max(left), max(right))` of node `n` (the sentinel's max is 0).
    #[inline(always)]
    fn compute_max(&self, n: u32) -> u64 {
        let node = self.nd(n);
        let l = self.nd(node.child(0)).max;
        let r = self.nd(node.child(1)).max;
        node.last.max(l).max(r)
    }

    /// Makes `new` the child of `parent` that `old` was (the root when `parent` is NIL).
    #[inline(always)]
    fn hook(&mut self, parent: u32, old: u32, new: u32) {
        if parent == NIL {
            self.root = new;
        } else {
            let pn = self.nd_mut(parent);
            let d = pn.side_of(old);
            pn.set_child(d, new);
        }
    }

    /// Lifts `p`'s child `c` on side `d` above `p` and returns it; `c` gets the whole up
    /// word `c_up` (its new parent, which must be `p`'s old one, and color) and `p` the
    /// color `p_red` ([`RED`] or 0), each written at once. Maxima and the other parent
    /// links are kept exact (provided the children's maxima are), except that the caller
    /// hooks `c` into `p`'s old parent.
    #[inline(always)]
    fn rotate(&mut self, p: u32, d: usize, c_up: u32, p_red: u32) -> u32 {
        let pn = self.nd(p);
        let (c, p_max) = (pn.child(d), pn.max);
        debug_assert_eq!(c_up & IDX_MASK, pn.parent());
        let inner = self.nd(c).child(1 - d);
        self.nd_mut(p).set_child(d, inner);
        if inner != NIL {
            self.nd_mut(inner).set_parent(p);
        }
        let cn = self.nd_mut(c);
        cn.set_child(1 - d, p);
        cn.max = p_max;
        cn.up = c_up;
        self.nd_mut(p).up = c | p_red;
        let m = self.compute_max(p);
        self.nd_mut(p).max = m;
        c
    }

    /// After the subtrees from `n` upwards lost an entry whose last was `gone`: recomputes
    /// maxima from `n` upwards, until one is unchanged or `stop` is reached (NIL: the
    /// root's parent). A node whose `max` is above `gone` has it from another entry that
    /// is still there, and so do all nodes above it (their maxima are at least as large):
    /// there the climb stops without reading the children.
    #[inline(always)]
    fn propagate(&mut self, mut n: u32, stop: u32, gone: u64) {
        while n != stop {
            if self.nd(n).max > gone {
                case!(PROPAGATE_MAX_ELSEWHERE);
                return;
            }
            let m = self.compute_max(n);
            let node = self.nd_mut(n);
            if node.max == m {
                case!(PROPAGATE_STOPS_EARLY);
                return;
            }
            node.max = m;
            n = node.parent();
        }
    }

    /// `x` is red and so is its parent `p`: recolor and rotate upwards until no red node
    /// has a red parent and the root is black. (Maxima were raised on the way down.)
    #[inline(always)]
    fn insert_fixup(&mut self, mut x: u32, mut p: u32) {
        loop {
            // p is red, so it is not the root, and its parent g is black.
            let g = self.nd(p).parent();
            let gn = self.nd(g);
            let pd = gn.side_of(p);
            let u = gn.child(1 - pd);
            if self.nd(u).is_red() {
                // Red uncle: push g's black down to p and u; g turns red, which may clash
                // with g's parent (the root stays black instead).
                case!(INS_RED_UNCLE);
                self.nd_mut(p).set_black();
                self.nd_mut(u).set_black();
                let gp = self.nd(g).parent();
                if gp == NIL {
                    case!(INS_RED_UNCLE_ROOT);
                    return;
                }
                self.nd_mut(g).set_red();
                if !self.nd(gp).is_red() {
                    return;
                }
                (x, p) = (g, gp);
                continue;
            }
            // Black uncle: one or two rotations put the middle one of x, p, g on top,
            // black, with the other two red below it.
            if self.nd(p).side_of(x) != pd {
                // x is the inner grandchild: lift it above p first.
                case!(INS_INNER);
                // Both stay red.
                self.rotate(p, 1 - pd, RED | g, RED);
                self.nd_mut(g).set_child(pd, x);
                p = x;
            }
            case!(INS_OUTER);
            let gp = self.nd(g).parent();
            // p turns black, g red.
            self.rotate(g, pd, gp, RED);
            self.hook(gp, g, p);
            return;
        }
    }

    /// `p`'s child on one side (NIL or a black node) has one black node fewer on its paths
    /// than its sibling: recolor and rotate until the black heights agree again.
    #[inline(always)]
    fn remove_fixup(&mut self, mut p: u32) {
        let mut x = NIL;
        loop {
            // An empty position is on the side whose link is NIL; the sibling is not
            // empty (its paths hold at least one black node more).
            let d = (self.nd(p).child(1) == x) as usize;
            let mut w = self.nd(p).child(1 - d);
            if self.nd(w).is_red() {
                // Red sibling: rotate it above p (black, p red below it); x's new sibling
                // is w's old inner child, black.
                case!(FIX_RED_SIBLING);
                let pp = self.nd(p).parent();
                self.rotate(p, 1 - d, pp, RED);
                self.hook(pp, p, w);
                w = self.nd(p).child(1 - d);
            }
            let mut far = self.nd(w).child(1 - d);
            if !self.nd(far).is_red() {
                let near = self.nd(w).child(d);
                if !self.nd(near).is_red() {
                    // Black sibling with black children: it turns red, and the shortage
                    // moves up to p (a red p absorbs it by turning black).
                    self.nd_mut(w).set_red();
                    if self.nd(p).is_red() {
                        case!(FIX_RED_PARENT_ABSORBS);
                        self.nd_mut(p).set_black();
                        return;
                    }
                    case!(FIX_CLIMB);
                    x = p;
                    p = self.nd(p).parent();
                    if p == NIL {
                        case!(FIX_AT_ROOT);
                        return;
                    }
                    continue;
                }
                // Red near nephew: lift it above w. It is x's new sibling, and w (black)
                // its far child, which the next step turns black anyway: no recoloring.
                case!(FIX_NEAR_NEPHEW);
                self.rotate(w, d, RED | p, 0);
                self.nd_mut(p).set_child(1 - d, near);
                (w, far) = (near, w);
            }
            // Red far nephew (or w after the lift): rotate w above p; w takes p's color,
            // p and the far nephew turn black, and x's side gains the black node it
            // lacked.
            case!(FIX_FAR_NEPHEW);
            let p_up = self.nd(p).up;
            self.rotate(p, 1 - d, p_up, 0);
            self.nd_mut(far).set_black();
            self.hook(p_up & IDX_MASK, p, w);
            return;
        }
    }
}

/// In-order iterator with an explicit stack.
struct Iter<'a, V> {
    tree: &'a IntervalTree<V>,
    stack: [u32; MAX_HEIGHT],
    sp: usize,
    next: u32,
    remaining: usize,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (NodeKey, u64, u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        let nodes = &self.tree.nodes;
        while self.next != NIL {
            self.stack[self.sp] = self.next;
            self.sp += 1;
            self.next = nodes[self.next as usize].child(0);
        }
        if self.sp == 0 {
            return None;
        }
        self.sp -= 1;
        let n = self.stack[self.sp];
        let node = &nodes[n as usize];
        self.next = node.child(1);
        self.remaining -= 1;
        let (key, value) = self.tree.entry(n);
        Some((key, node.start, node.last, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<V> ExactSizeIterator for Iter<'_, V> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps<V: Clone>(t: &IntervalTree<V>, s: u64, l: u64) -> Vec<(u64, u64, V)> {
        let mut v = Vec::new();
        t.for_each_overlap(s, l, |_, a, b, x| v.push((a, b, x.clone())));
        v
    }

    #[test]
    fn empty_tree() {
        let t: IntervalTree<u32> = IntervalTree::new();
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
        assert!(overlaps(&t, 0, u64::MAX).is_empty());
        assert!(!t.overlaps_any(0, u64::MAX));
        assert_eq!(t.iter().count(), 0);
        t.check_invariants();
        let d: IntervalTree<u32> = IntervalTree::default();
        assert!(d.is_empty());
        assert_eq!(format!("{d:?}"), "[]");
    }

    #[test]
    fn node_is_small() {
        assert_eq!(std::mem::size_of::<Node>(), 40);
        assert_eq!(IntervalTree::<u64>::bytes_per_entry(), 40);
        // What an interval subscription costs here: its node plus the slot of the
        // `Arc<dyn ...>` (a fat pointer; `None` is its niche) that the tree's value is.
        let per_subscription = IntervalTree::<std::sync::Arc<dyn Fn()>>::bytes_per_entry()
            + std::mem::size_of::<Option<std::sync::Arc<dyn Fn()>>>();
        assert_eq!(per_subscription, 56);
    }

    #[test]
    fn duplicates_are_distinct_entries() {
        let mut t = IntervalTree::new();
        let keys: Vec<_> = (0..10).map(|i| t.insert(5, 9, i).unwrap()).collect();
        t.check_invariants();
        assert_eq!(t.len(), 10);
        let mut got: Vec<_> = overlaps(&t, 9, 9).into_iter().map(|x| x.2).collect();
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        for (i, k) in keys.iter().enumerate().step_by(2) {
            assert_eq!(t.remove(*k), Some(i));
            t.check_invariants();
        }
        let mut got: Vec<_> = t.iter().map(|x| *x.3).collect();
        got.sort();
        assert_eq!(got, [1, 3, 5, 7, 9]);
        assert!(t.overlaps_any(0, 5));
        assert!(!t.overlaps_any(10, 20));
        assert!(!t.overlaps_any(0, 4));
    }

    #[test]
    fn zero_and_max_bounds() {
        let mut t = IntervalTree::new();
        let z = t.insert(0, 0, 'z').unwrap();
        let m = t.insert(7, u64::MAX, 'm').unwrap();
        let all = t.insert(0, u64::MAX, 'a').unwrap();
        let top = t.insert(u64::MAX, u64::MAX, 't').unwrap();
        t.check_invariants();
        assert_eq!(t.get(z), Some((0, 0, &'z')));
        assert_eq!(t.get(m), Some((7, u64::MAX, &'m')));
        assert_eq!(overlaps(&t, 0, 0), [(0, 0, 'z'), (0, u64::MAX, 'a')]);
        assert_eq!(
            overlaps(&t, u64::MAX, u64::MAX),
            [
                (0, u64::MAX, 'a'),
                (7, u64::MAX, 'm'),
                (u64::MAX, u64::MAX, 't')
            ]
        );
        assert_eq!(overlaps(&t, 1, 6), [(0, u64::MAX, 'a')]);
        assert_eq!(overlaps(&t, 0, u64::MAX).len(), 4);
        assert!(t.overlaps_any(u64::MAX, u64::MAX));
        assert_eq!(t.remove(all), Some('a'));
        assert_eq!(t.remove(top), Some('t'));
        t.check_invariants();
        assert!(!t.overlaps_any(1, 6));
        assert!(t.overlaps_any(1, 7));
        assert_eq!(overlaps(&t, u64::MAX, u64::MAX), [(7, u64::MAX, 'm')]);
    }

    #[test]
    fn stale_and_foreign_keys() {
        let mut t = IntervalTree::new();
        let a = t.insert(10, 20, 1).unwrap();
        assert_eq!(t.remove(a), Some(1));
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get(a), None);
        let b = t.insert(10, 20, 2).unwrap();
        // The slot is reused, but the stale key still misses.
        assert_eq!(b.index, a.index);
        assert_ne!(b, a);
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get_mut(a), None);
        *t.get_mut(b).unwrap() = 3;
        assert_eq!(t.get(b), Some((10, 20, &3)));
        // Out-of-range, sentinel and other trees' keys.
        assert_eq!(
            t.remove(NodeKey {
                index: 999,
                generation: 0
            }),
            None
        );
        assert_eq!(
            t.remove(NodeKey {
                index: 0,
                generation: 0
            }),
            None
        );
        let mut other = IntervalTree::new();
        let o = other.insert(10, 20, 9).unwrap();
        assert_eq!(t.get(o), None);
        assert_eq!(t.remove(o), None);
        assert_eq!(t.len(), 1);
        t.check_invariants();
    }

    #[test]
    fn key_bits_round_trip() {
        let mut t = IntervalTree::new();
        let keys: Vec<_> = (0..100u64)
            .map(|i| t.insert(i, i + 1, i).unwrap())
            .collect();
        for k in keys {
            let bits = k.to_bits();
            assert_eq!(bits >> 63, 0);
            assert_eq!(NodeKey::from_bits(bits), k);
        }
        assert_eq!(t.get(NodeKey::from_bits(u64::MAX)), None);
        assert_eq!(t.remove(NodeKey::from_bits(u64::MAX - 1)), None);
    }

    #[test]
    fn invalid_interval_is_an_error() {
        let mut t = IntervalTree::new();
        let e = t.insert(5, 4, ()).unwrap_err();
        assert_eq!(e, InvalidInterval { start: 5, last: 4 });
        assert_eq!(
            e.to_string(),
            "invalid interval: start 0x5 is after last 0x4"
        );
        let _: &dyn std::error::Error = &e;
        assert!(t.is_empty());
        t.check_invariants();
        // An empty query matches nothing.
        t.insert(0, 100, ()).unwrap();
        assert!(!t.overlaps_any(50, 49));
        let mut hit = false;
        t.for_each_overlap(50, 49, |_, _, _, _| hit = true);
        assert!(!hit);
    }

    #[test]
    fn sequential_inserts_and_removals_stay_balanced() {
        let mut t = IntervalTree::new();
        let keys: Vec<_> = (0..1000u64)
            .map(|i| t.insert(i * 10, i * 10 + 15, i).unwrap())
            .collect();
        t.check_invariants();
        let it: Vec<_> = t.iter().map(|x| *x.3).collect();
        assert_eq!(it, (0..1000).collect::<Vec<_>>());
        assert_eq!(t.iter().size_hint(), (1000, Some(1000)));
        assert_eq!(
            overlaps(&t, 100, 105)
                .into_iter()
                .map(|x| x.2)
                .collect::<Vec<_>>(),
            [9, 10]
        );
        for (i, k) in keys.iter().enumerate().rev() {
            assert_eq!(t.remove(*k), Some(i as u64));
            if i % 97 == 0 {
                t.check_invariants();
            }
        }
        assert!(t.is_empty());
        t.check_invariants();
    }

    /// Random and adversarial workloads reach every rebalancing case, with every
    /// invariant checked after every operation (so a wrong case cannot go unnoticed).
    #[test]
    fn every_rebalancing_case_is_exercised_and_checked() {
        cases::HITS.with(|h| h.set([0; cases::COUNT]));
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rng = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut t = IntervalTree::new();
        let mut live = Vec::new();
        for step in 0..6000u64 {
            // Grow, shrink, grow: the tree swings between about 0 and 300 entries.
            let grow = (step / 1000) % 2 == 0;
            if live.is_empty() || rng(10) < if grow { 7 } else { 3 } {
                let s = match rng(3) {
                    0 => step,           // ascending
                    1 => 100_000 - step, // descending
                    _ => rng(512),       // random, with duplicates
                };
                live.push(t.insert(s, s + rng(64), step).unwrap());
            } else {
                let k = live.swap_remove(rng(live.len() as u64) as usize);
                assert!(t.remove(k).is_some());
            }
            t.check_invariants();
        }
        let hits = cases::HITS.with(|h| h.get());
        for (case, n) in hits.iter().enumerate() {
            assert!(*n > 0, "rebalancing case {case} never ran: {hits:?}");
        }
    }

    /// The storage grows fourfold from 16 slots up to 1024, then by doubling, both
    /// vectors together, and not while freed slots are there to reuse.
    #[test]
    fn storage_grows_geometrically_and_reuses_freed_slots() {
        let mut t = IntervalTree::new();
        assert_eq!(t.nodes.capacity(), 0);
        let mut caps = vec![];
        let mut keys = vec![];
        for i in 0..3000u64 {
            keys.push(t.insert(i, i, i).unwrap());
            let cap = t.nodes.capacity();
            assert_eq!(cap, t.values.capacity(), "vectors grew apart");
            let len = t.nodes.len();
            let bound = if len <= 1024 { 4 * len + 16 } else { 2 * len };
            assert!(cap <= bound, "capacity {cap} at {len}");
            if caps.last() != Some(&cap) {
                caps.push(cap);
            }
        }
        assert_eq!(caps, [16, 64, 256, 1024, 2048, 4096]);
        for k in keys.drain(..1500) {
            t.remove(k).unwrap();
        }
        for i in 0..1500u64 {
            t.insert(i, i, i).unwrap();
        }
        assert_eq!((t.nodes.len(), t.nodes.capacity()), (3001, 4096));
        t.check_invariants();
    }

    /// A clone gets a room bound from its own capacities (a cloned vector may have less
    /// room than the original), and keeps working as the original does.
    #[test]
    fn clone_has_its_own_room() {
        let mut t = IntervalTree::new();
        let keys: Vec<_> = (0..40u64).map(|i| t.insert(i, i + 3, i).unwrap()).collect();
        assert_eq!(t.nodes.capacity(), 64);
        let mut c = t.clone();
        assert!(
            c.nodes.capacity() < 64,
            "the clone has the original's slack"
        );
        c.check_invariants();
        // Into the clone until it grows twice: every write lands inside its storage.
        for i in 40..200u64 {
            c.insert(i, i + 3, i).unwrap();
            c.check_invariants();
        }
        assert_eq!(c.remove(keys[7]), Some(7));
        assert_eq!(c.len(), 199);
        // The original is untouched.
        assert_eq!(t.len(), 40);
        assert_eq!(t.get(keys[7]), Some((7, 10, &7)));
        t.check_invariants();
    }

    #[test]
    fn debug_lists_entries() {
        let mut t = IntervalTree::new();
        t.insert(3, 4, "b").unwrap();
        t.insert(1, 2, "a").unwrap();
        assert_eq!(format!("{t:?}"), r#"[(1..=2, "a"), (3..=4, "b")]"#);
    }
}
