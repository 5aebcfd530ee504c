//! An interval tree over closed `u64` ranges: the index the interval subscribers live in
//! (the counterpart of Linux's `interval_tree`, an augmented red-black tree).
//!
//! # Structure
//!
//! [`IntervalTree`] is an AVL tree kept in an arena. Every entry owns one *slot* index,
//! `1..2^31`, into two parallel vectors:
//!
//! - `nodes`, the hot part that lookups walk: `start`, `last`, the subtree maximum `max`
//!   and the two child links, 32 bytes aligned to 32 so that a node never straddles a
//!   cache line. A link is a `u32` slot index (0 is the empty link) whose top bit is the
//!   node's AVL balance: set in `left` when the left subtree is one level taller, set in
//!   `right` when the right one is, neither when both are equally tall.
//! - `slots`, the cold part: the generation of the slot and, when occupied, the value.
//!
//! Freed slots are chained into a free list (through the dead node's left link) and reused
//! with their generation bumped, so a [`NodeKey`] — slot index plus generation — is a
//! stable handle that keeps working while other entries come and go, and that is reliably
//! refused once its own entry has been removed. Each tree starts its generations at a
//! different base, so a key from another tree is almost always refused as well.
//!
//! Index 0 is a sentinel node (all zero) that is never linked into the tree, so an empty
//! link reads as a subtree whose maximum is 0 and needs no branch when maxima are
//! recomputed.
//!
//! There are no parent links: insertion and removal walk down from the root (removal
//! finds the entry by its key `(start, index)`), remember the path on a fixed-size stack
//! and retrace it upwards. An AVL tree of fewer than 2^31 nodes is at most 44 levels tall,
//! so every stack here is a small array and nothing recurses.
//!
//! # Order and augmentation invariants
//!
//! - **Order.** An in-order walk visits entries ascending by `(start, index)`: the slot
//!   index breaks ties, so duplicate intervals are distinct, totally ordered entries and
//!   removal can find an exact entry by descending.
//! - **Balance.** At every node the heights of the two subtrees differ by at most one, and
//!   the balance bits say which one (if either) is taller.
//! - **Augmentation.** Every node's `max` is the largest `last` in its subtree:
//!   `max(n) = max(last(n), max(left(n)), max(right(n)))` — Linux's `__subtree_last`.
//!   Insertion raises `max` on its way down; a rotation hands the old subtree root's `max`
//!   to the new subtree root (same set of entries) and recomputes the demoted node's;
//!   removal recomputes `max` bottom-up along its path and stops once neither the height
//!   nor the `max` of a subtree above the removed entry changed.
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
/// The bits of a link that hold a slot index.
const IDX_MASK: u32 = 0x7FFF_FFFF;
/// The bit of a link that says "this side is the taller one".
const HEAVY: u32 = 0x8000_0000;
/// Balance value: neither side is taller (the sides themselves are 0 = left, 1 = right).
const EVEN: usize = 2;
/// Room for any root-to-leaf path: an AVL tree of fewer than 2^31 nodes is at most
/// 44 levels tall.
const MAX_HEIGHT: usize = 48;

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

/// The hot part of an entry: what every descent reads.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(32))]
struct Node {
    start: u64,
    last: u64,
    /// The largest `last` in this node's subtree.
    max: u64,
    /// Left and right child indices; the top bit of each is the AVL balance.
    link: [u32; 2],
}

impl Node {
    #[inline(always)]
    fn child(&self, d: usize) -> u32 {
        self.link[d] & IDX_MASK
    }

    /// The taller side (0 = left, 1 = right), or [`EVEN`].
    #[inline(always)]
    fn heavy(&self) -> usize {
        if self.link[0] & HEAVY != 0 {
            0
        } else if self.link[1] & HEAVY != 0 {
            1
        } else {
            EVEN
        }
    }

    #[inline(always)]
    fn set_heavy(&mut self, h: usize) {
        self.link[0] &= IDX_MASK;
        self.link[1] &= IDX_MASK;
        if h < 2 {
            self.link[h] |= HEAVY;
        }
    }

    /// Replaces the child on side `d`, keeping the balance bit.
    #[inline(always)]
    fn set_child(&mut self, d: usize, c: u32) {
        self.link[d] = (self.link[d] & HEAVY) | c;
    }
}

/// The cold part of an entry.
#[derive(Clone, Debug)]
enum Slot<V> {
    /// Free; the next free slot is in the dead node's left link. `gen` is the generation
    /// the next entry in this slot gets.
    Vacant { gen: u32 },
    /// In use by the entry with this generation.
    Occupied { gen: u32, value: V },
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
#[derive(Clone)]
pub struct IntervalTree<V> {
    /// Hot halves of the entries; index 0 is the sentinel (pushed with the first entry).
    nodes: Vec<Node>,
    /// Cold halves, parallel to `nodes`.
    slots: Vec<Slot<V>>,
    root: u32,
    /// Head of the free-slot list, [`NIL`] when empty.
    free: u32,
    len: usize,
    /// The generation of a slot's first entry.
    gen_base: u32,
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
            slots: Vec::new(),
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

    /// Approximate heap bytes one entry takes, not counting its value `V`: the hot node
    /// plus the slot's tag and generation (vector growth slack not included).
    pub fn bytes_per_entry() -> usize {
        std::mem::size_of::<Node>() + std::mem::size_of::<Slot<()>>()
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
    /// If the tree already holds 2^31 − 1 entries (about 86 GB of nodes).
    pub fn insert(&mut self, start: u64, last: u64, value: V) -> Result<NodeKey, InvalidInterval> {
        if start > last {
            return Err(InvalidInterval { start, last });
        }
        let (idx, generation) = self.alloc(start, last, value);
        self.len += 1;
        let key = NodeKey {
            index: idx,
            generation,
        };
        if self.root == NIL {
            self.root = idx;
            return Ok(key);
        }
        let mut path = [NIL; MAX_HEIGHT];
        let mut dirs = 0u64;
        let mut depth = 0;
        let mut n = self.root;
        loop {
            let node = &mut self.nodes[n as usize];
            if node.max < last {
                node.max = last;
            }
            let d = ((start > node.start) | ((start == node.start) & (idx > n))) as usize;
            path[depth] = n;
            dirs |= (d as u64) << depth;
            depth += 1;
            let c = node.child(d);
            if c == NIL {
                node.set_child(d, idx);
                break;
            }
            n = c;
        }
        self.insert_retrace(&path, dirs, depth);
        Ok(key)
    }

    /// Removes the entry `key` names and returns its value, or `None` if the key is stale
    /// (its entry was already removed) or does not belong to this tree. O(log n).
    pub fn remove(&mut self, key: NodeKey) -> Option<V> {
        let z = key.index;
        match self.slots.get(z as usize) {
            Some(Slot::Occupied { gen, .. }) if *gen == key.generation && z != NIL => {}
            _ => return None,
        }
        let zstart = self.nodes[z as usize].start;

        // Walk down to z by its key (start, index), remembering the path.
        let mut path = [NIL; MAX_HEIGHT];
        let mut dirs = 0u64;
        let mut depth = 0;
        let mut n = self.root;
        while n != z {
            let node = &self.nodes[n as usize];
            let d = ((zstart > node.start) | ((zstart == node.start) & (z > n))) as usize;
            path[depth] = n;
            dirs |= (d as u64) << depth;
            depth += 1;
            n = node.child(d);
            debug_assert_ne!(n, NIL, "entry {z} is not reachable from the root");
        }

        let [zl, zr] = self.nodes[z as usize].link.map(|l| l & IDX_MASK);
        // Path entries at or above `zi` are at or above z's position: once nothing
        // changes there, nothing above changes either.
        let zi = depth;
        if zl != NIL && zr != NIL {
            // Two children: the successor s (leftmost of the right subtree) leaves its
            // place to its right child and takes z's place, links and balance.
            path[depth] = z;
            dirs |= 1 << depth;
            depth += 1;
            let mut s = zr;
            loop {
                let l = self.nodes[s as usize].child(0);
                if l == NIL {
                    break;
                }
                path[depth] = s;
                depth += 1; // direction 0: the bit stays clear
                s = l;
            }
            let sr = self.nodes[s as usize].child(1);
            let sp = path[depth - 1];
            let sd = ((dirs >> (depth - 1)) & 1) as usize;
            self.nodes[sp as usize].set_child(sd, sr);
            let zn = self.nodes[z as usize];
            let sn = &mut self.nodes[s as usize];
            sn.link = zn.link;
            sn.max = zn.max;
            path[zi] = s;
            self.replace_child(&path, dirs, zi, s);
        } else {
            // At most one child: it takes z's place (one of zl, zr is NIL = 0).
            self.replace_child(&path, dirs, depth, zl | zr);
        }
        self.remove_retrace(&path, dirs, depth, zi);

        self.len -= 1;
        self.nodes[z as usize] = Node {
            link: [self.free, NIL],
            ..Node::default()
        };
        self.free = z;
        let slot = std::mem::replace(
            &mut self.slots[z as usize],
            Slot::Vacant {
                gen: key.generation.wrapping_add(1),
            },
        );
        match slot {
            Slot::Occupied { value, .. } => Some(value),
            Slot::Vacant { .. } => unreachable!("checked occupied above"),
        }
    }

    /// The interval and value of the entry `key` names, or `None` for a stale or foreign
    /// key. O(1).
    pub fn get(&self, key: NodeKey) -> Option<(u64, u64, &V)> {
        match self.slots.get(key.index as usize) {
            Some(Slot::Occupied { gen, value }) if *gen == key.generation => {
                let n = &self.nodes[key.index as usize];
                Some((n.start, n.last, value))
            }
            _ => None,
        }
    }

    /// The value of the entry `key` names, mutably, or `None` for a stale or foreign key.
    /// O(1). (The interval itself cannot change: remove and insert again.)
    pub fn get_mut(&mut self, key: NodeKey) -> Option<&mut V> {
        match self.slots.get_mut(key.index as usize) {
            Some(Slot::Occupied { gen, value }) if *gen == key.generation => Some(value),
            _ => None,
        }
    }

    /// Calls `f(key, start, last, value)` for every entry that overlaps the closed range
    /// `[start, last]` (shares at least one point with it), ascending by start; entries
    /// with equal starts come in a fixed order (by slot). O(log n + k) for k results.
    ///
    /// A query with `start > last` is empty and matches nothing.
    pub fn for_each_overlap(&self, start: u64, last: u64, mut f: impl FnMut(NodeKey, u64, u64, &V)) {
        if start > last || self.root == NIL {
            return;
        }
        let nodes = &self.nodes[..];
        let mut stack = [NIL; MAX_HEIGHT];
        let mut sp = 0;
        let mut n = self.root;
        loop {
            // Go down-left through subtrees that hold something ending at or after start.
            while n != NIL {
                let node = &nodes[n as usize];
                if node.max < start {
                    break;
                }
                stack[sp] = n;
                sp += 1;
                n = node.child(0);
            }
            if sp == 0 {
                return;
            }
            sp -= 1;
            n = stack[sp];
            let node = &nodes[n as usize];
            if node.start > last {
                // This node, its right subtree and every ancestor left on the stack start
                // after the query.
                return;
            }
            if node.last >= start {
                let (generation, value) = self.occupied(n);
                f(
                    NodeKey {
                        index: n,
                        generation,
                    },
                    node.start,
                    node.last,
                    value,
                );
            }
            n = node.child(1);
        }
    }

    /// Whether any entry overlaps the closed range `[start, last]`. O(log n).
    ///
    /// A query with `start > last` is empty and overlaps nothing.
    pub fn overlaps_any(&self, start: u64, last: u64) -> bool {
        if start > last {
            return false;
        }
        let nodes = &self.nodes[..];
        let mut n = self.root;
        while n != NIL {
            let node = &nodes[n as usize];
            if node.max < start {
                return false;
            }
            if node.start <= last && node.last >= start {
                return true;
            }
            let l = node.child(0);
            // If the left subtree has an entry ending at or after `start`, it holds an
            // overlap unless that entry starts after `last` — and then so does everything
            // from this node on. Otherwise nothing on the left can overlap.
            if l != NIL && nodes[l as usize].max >= start {
                n = l;
            } else if node.start > last {
                return false;
            } else {
                n = node.child(1);
            }
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
    /// that is broken: order by `(start, index)`, AVL balance and its bits, subtree
    /// maxima, `len`, the slots and the free list. O(n); for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        assert_eq!(self.nodes.len(), self.slots.len(), "nodes and slots differ in length");
        if self.nodes.is_empty() {
            assert_eq!(self.root, NIL);
            assert_eq!(self.len, 0);
            return;
        }
        let s = &self.nodes[0];
        assert!(
            s.start == 0 && s.last == 0 && s.max == 0 && s.link == [0, 0],
            "sentinel modified: {s:?}"
        );
        assert!(matches!(self.slots[0], Slot::Vacant { .. }), "sentinel slot occupied");
        let mut seen = vec![false; self.nodes.len()];
        let mut prev: Option<(u64, u32)> = None;
        let (_, count) = self.check_subtree(self.root, &mut seen, &mut prev);
        assert_eq!(count, self.len, "reachable entries != len");
        let occupied = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Occupied { .. }))
            .count();
        assert_eq!(occupied, self.len, "occupied slots != len");
        let mut f = self.free;
        let mut free = 0;
        while f != NIL {
            assert!(matches!(self.slots[f as usize], Slot::Vacant { .. }), "free slot {f} occupied");
            assert!(!seen[f as usize], "free slot {f} is in the tree");
            seen[f as usize] = true;
            free += 1;
            assert!(free < self.nodes.len(), "free list cycles");
            f = self.nodes[f as usize].link[0];
        }
        assert_eq!(free + self.len + 1, self.nodes.len(), "slots leaked from the free list");
    }

    /// Returns (height, entry count) of the subtree at `n`, checking it.
    fn check_subtree(&self, n: u32, seen: &mut [bool], prev: &mut Option<(u64, u32)>) -> (u32, usize) {
        if n == NIL {
            return (0, 0);
        }
        assert!(!seen[n as usize], "node {n} reached twice");
        seen[n as usize] = true;
        assert!(
            matches!(self.slots[n as usize], Slot::Occupied { .. }),
            "node {n} in the tree has a vacant slot"
        );
        let node = self.nodes[n as usize];
        assert!(node.start <= node.last, "node {n}: start > last");
        assert!(
            node.link[0] & node.link[1] & HEAVY == 0,
            "node {n}: both sides marked taller"
        );
        let (hl, cl) = self.check_subtree(node.child(0), seen, prev);
        let key = (node.start, n);
        if let Some(p) = *prev {
            assert!(p < key, "order broken: {p:?} before {key:?}");
        }
        *prev = Some(key);
        let (hr, cr) = self.check_subtree(node.child(1), seen, prev);
        let expect = match hl.cmp(&hr) {
            std::cmp::Ordering::Greater => 0,
            std::cmp::Ordering::Less => 1,
            std::cmp::Ordering::Equal => EVEN,
        };
        assert!(hl.abs_diff(hr) <= 1, "node {n}: unbalanced, heights {hl} and {hr}");
        assert_eq!(node.heavy(), expect, "node {n}: wrong balance bits (heights {hl}, {hr})");
        assert_eq!(node.max, self.compute_max(n), "node {n}: wrong subtree max");
        (1 + hl.max(hr), 1 + cl + cr)
    }

    /// Takes a slot for a new, unlinked node; returns its index and generation.
    fn alloc(&mut self, start: u64, last: u64, value: V) -> (u32, u32) {
        let node = Node {
            start,
            last,
            max: last,
            link: [NIL; 2],
        };
        if self.free != NIL {
            let idx = self.free;
            self.free = self.nodes[idx as usize].link[0];
            let slot = &mut self.slots[idx as usize];
            let Slot::Vacant { gen } = *slot else {
                unreachable!("free list holds occupied slot {idx}")
            };
            *slot = Slot::Occupied { gen, value };
            self.nodes[idx as usize] = node;
            return (idx, gen);
        }
        if self.nodes.is_empty() {
            self.nodes.push(Node::default());
            self.slots.push(Slot::Vacant { gen: 0 });
        }
        let idx = self.nodes.len();
        assert!(idx <= IDX_MASK as usize, "IntervalTree is full (2^31 - 1 entries)");
        self.nodes.push(node);
        self.slots.push(Slot::Occupied {
            gen: self.gen_base,
            value,
        });
        (idx as u32, self.gen_base)
    }

    /// The generation and value of an occupied slot.
    #[inline]
    fn occupied(&self, n: u32) -> (u32, &V) {
        match &self.slots[n as usize] {
            Slot::Occupied { gen, value } => (*gen, value),
            Slot::Vacant { .. } => unreachable!("node {n} in the tree has a vacant slot"),
        }
    }

    /// `max(last, max(left), max(right))` of node `n` (the sentinel's max is 0).
    #[inline(always)]
    fn compute_max(&self, n: u32) -> u64 {
        let node = &self.nodes[n as usize];
        let l = self.nodes[node.child(0) as usize].max;
        let r = self.nodes[node.child(1) as usize].max;
        node.last.max(l).max(r)
    }

    /// Makes `c` the child that `path[i]` had on the path (the root when `i == 0`).
    #[inline(always)]
    fn replace_child(&mut self, path: &[u32; MAX_HEIGHT], dirs: u64, i: usize, c: u32) {
        if i == 0 {
            self.root = c;
        } else {
            let d = ((dirs >> (i - 1)) & 1) as usize;
            self.nodes[path[i - 1] as usize].set_child(d, c);
        }
    }

    /// Lifts `p`'s child on side `d` above `p` and returns it. Maxima are kept exact
    /// (provided the children's are); balance bits are the caller's job.
    #[inline(always)]
    fn rotate(&mut self, p: u32, d: usize) -> u32 {
        let c = self.nodes[p as usize].child(d);
        let inner = self.nodes[c as usize].child(1 - d);
        self.nodes[p as usize].set_child(d, inner);
        let pmax = self.nodes[p as usize].max;
        let cn = &mut self.nodes[c as usize];
        cn.set_child(1 - d, p);
        cn.max = pmax;
        self.nodes[p as usize].max = self.compute_max(p);
        c
    }

    /// `p` is two levels taller on side `e` than on the other: rotate it back into
    /// balance. Returns the new subtree root and whether the subtree got shorter than it
    /// was before rebalancing (always true after an insertion).
    fn rebalance(&mut self, p: u32, e: usize) -> (u32, bool) {
        let c = self.nodes[p as usize].child(e);
        let ch = self.nodes[c as usize].heavy();
        if ch == 1 - e {
            let g = self.nodes[c as usize].child(1 - e);
            let gh = self.nodes[g as usize].heavy();
            let g1 = self.rotate(c, 1 - e);
            debug_assert_eq!(g1, g);
            self.nodes[p as usize].set_child(e, g);
            self.rotate(p, e);
            self.nodes[p as usize].set_heavy(if gh == e { 1 - e } else { EVEN });
            self.nodes[c as usize].set_heavy(if gh == 1 - e { e } else { EVEN });
            self.nodes[g as usize].set_heavy(EVEN);
            (g, true)
        } else {
            self.rotate(p, e);
            if ch == e {
                self.nodes[p as usize].set_heavy(EVEN);
                self.nodes[c as usize].set_heavy(EVEN);
                (c, true)
            } else {
                // Only after a removal: the sibling was even.
                self.nodes[p as usize].set_heavy(e);
                self.nodes[c as usize].set_heavy(1 - e);
                (c, false)
            }
        }
    }

    /// After a leaf was hung below `path[depth - 1]`: restore the balance upwards.
    /// (Maxima were raised on the way down.)
    fn insert_retrace(&mut self, path: &[u32; MAX_HEIGHT], dirs: u64, depth: usize) {
        let mut i = depth;
        while i > 0 {
            i -= 1;
            let p = path[i];
            let d = ((dirs >> i) & 1) as usize;
            let h = self.nodes[p as usize].heavy();
            if h == EVEN {
                // Taller by one on side d; so is the whole subtree.
                self.nodes[p as usize].set_heavy(d);
            } else if h != d {
                self.nodes[p as usize].set_heavy(EVEN);
                return;
            } else {
                let (top, _) = self.rebalance(p, d);
                self.replace_child(path, dirs, i, top);
                return;
            }
        }
    }

    /// After the subtree below `path[depth - 1]` on the path's side lost an entry:
    /// recompute maxima and restore the balance upwards. `zi` is the path index of the
    /// removed entry's position.
    fn remove_retrace(&mut self, path: &[u32; MAX_HEIGHT], dirs: u64, depth: usize, zi: usize) {
        let mut shrunk = true;
        let mut i = depth;
        while i > 0 {
            i -= 1;
            let p = path[i];
            let d = ((dirs >> i) & 1) as usize;
            let old_max = self.nodes[p as usize].max;
            let new_max = self.compute_max(p);
            self.nodes[p as usize].max = new_max;
            if shrunk {
                let h = self.nodes[p as usize].heavy();
                if h == d {
                    self.nodes[p as usize].set_heavy(EVEN);
                } else if h == EVEN {
                    self.nodes[p as usize].set_heavy(1 - d);
                    shrunk = false;
                } else {
                    let (top, still) = self.rebalance(p, 1 - d);
                    self.replace_child(path, dirs, i, top);
                    shrunk = still;
                }
            }
            // The subtree root's max is new_max either way (a rotation passes it on).
            if !shrunk && new_max == old_max && i <= zi {
                return;
            }
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
        let (generation, value) = self.tree.occupied(n);
        Some((
            NodeKey {
                index: n,
                generation,
            },
            node.start,
            node.last,
            value,
        ))
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
        assert_eq!(std::mem::size_of::<Node>(), 32);
        assert!(IntervalTree::<u64>::bytes_per_entry() <= 48);
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
            [(0, u64::MAX, 'a'), (7, u64::MAX, 'm'), (u64::MAX, u64::MAX, 't')]
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
        assert_eq!(t.remove(NodeKey { index: 999, generation: 0 }), None);
        assert_eq!(t.remove(NodeKey { index: 0, generation: 0 }), None);
        let mut other = IntervalTree::new();
        let o = other.insert(10, 20, 9).unwrap();
        assert_eq!(t.get(o), None);
        assert_eq!(t.remove(o), None);
        assert_eq!(t.len(), 1);
        t.check_invariants();
    }

    #[test]
    fn invalid_interval_is_an_error() {
        let mut t = IntervalTree::new();
        let e = t.insert(5, 4, ()).unwrap_err();
        assert_eq!(e, InvalidInterval { start: 5, last: 4 });
        assert_eq!(e.to_string(), "invalid interval: start 0x5 is after last 0x4");
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
        let keys: Vec<_> = (0..1000u64).map(|i| t.insert(i * 10, i * 10 + 15, i).unwrap()).collect();
        t.check_invariants();
        let it: Vec<_> = t.iter().map(|x| *x.3).collect();
        assert_eq!(it, (0..1000).collect::<Vec<_>>());
        assert_eq!(t.iter().size_hint(), (1000, Some(1000)));
        assert_eq!(
            overlaps(&t, 100, 105).into_iter().map(|x| x.2).collect::<Vec<_>>(),
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

    #[test]
    fn debug_lists_entries() {
        let mut t = IntervalTree::new();
        t.insert(3, 4, "b").unwrap();
        t.insert(1, 2, "a").unwrap();
        assert_eq!(format!("{t:?}"), r#"[(1..=2, "a"), (3..=4, "b")]"#);
    }
}
