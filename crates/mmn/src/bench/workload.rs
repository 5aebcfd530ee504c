//! The interval-tree workload: ranges of 1..=64 pages (4 KiB) at random page-aligned starts
//! in a 1 TiB space, random 2 MiB queries, and a random removal order, all from fixed
//! seeds. Plain `std` code with no dependency, shared by `mmn bench` and the criterion
//! bench `crates/mmu-notifier/benches/itree.rs` (which includes this file), so both
//! measure exactly the same trees.

/// Page size of the workload.
pub const PAGE: u64 = 4096;
/// The address space the ranges are drawn from: 1 TiB.
pub const SPACE: u64 = 1 << 40;
/// Length of a query range: 2 MiB.
pub const QUERY_LEN: u64 = 2 << 20;

/// xorshift64*: deterministic and dependency-free.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random number below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed of the ranges of a tree of `n` entries.
pub fn ranges_seed(n: usize) -> u64 {
    0x9E37_79B9_7F4A_7C15 ^ n as u64
}

/// The seed of the queries on a tree of `n` entries.
pub fn query_seed(n: usize) -> u64 {
    0xD1B5_4A32_D192_ED03 ^ n as u64
}

/// The seed of the removal order of a tree of `n` entries.
pub fn order_seed(n: usize) -> u64 {
    0x94D0_49BB_1331_11EB ^ n as u64
}

/// `n` closed ranges `[start, last]` of 1..=64 pages at page-aligned starts.
pub fn ranges(n: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let start = rng.below(SPACE / PAGE) * PAGE;
            let pages = 1 + rng.below(64);
            (start, start + pages * PAGE - 1)
        })
        .collect()
}

/// A random 2 MiB query range `[start, last]` at a page-aligned start.
pub fn query_range(rng: &mut Rng) -> (u64, u64) {
    let start = rng.below(SPACE / PAGE) * PAGE;
    (start, start + QUERY_LEN - 1)
}

/// A random permutation of `0..n` (Fisher–Yates): the removal order.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

/// Length of a block of the invalidation workload: 64 pages.
pub const BLOCK: u64 = 64 * PAGE;
/// Half the number of blocks in the space: the even blocks hold subscriptions, the odd
/// ones stay empty.
const HALF_BLOCKS: u64 = SPACE / BLOCK / 2;

/// The seed of the invalidation workload's subscriptions and misses at `n` subscriptions.
pub fn disjoint_seed(n: usize) -> u64 {
    0x2545_F491_4F6C_DD1D ^ n as u64
}

/// `n` (at most 2^21) pairwise disjoint ranges `[start, last]` of 1..=64 pages, each at
/// the start of its own even 64-page block, the blocks in a scattered order.
pub fn disjoint_ranges(n: usize, seed: u64) -> Vec<(u64, u64)> {
    assert!(n as u64 <= HALF_BLOCKS, "at most 2^21 disjoint ranges");
    let mut rng = Rng(seed);
    (0..n as u64)
        .map(|k| {
            // k -> k * odd mod 2^21 is a bijection: distinct blocks.
            let block = (k.wrapping_mul(0x9E37_79B9) % HALF_BLOCKS) * 2;
            let start = block * BLOCK;
            (start, start + (1 + rng.below(64)) * PAGE - 1)
        })
        .collect()
}

/// A random one-page range `[start, last]` at the start of an odd block: it overlaps none
/// of the [`disjoint_ranges`], but a search for it descends to the bottom of the tree.
pub fn miss_range(rng: &mut Rng) -> (u64, u64) {
    let start = (rng.below(HALF_BLOCKS) * 2 + 1) * BLOCK;
    (start, start + PAGE - 1)
}
