//! Virtual memory areas: the layout half of an address space.

use std::collections::BTreeMap;

/// Access a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Prot {
    /// No access (`PROT_NONE`).
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
    };
    /// `PROT_READ`.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// `PROT_READ | PROT_WRITE`.
    pub const READ_WRITE: Prot = Prot {
        read: true,
        write: true,
    };
}

/// One mapping `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address (page aligned).
    pub start: u64,
    /// One past the last address (page aligned).
    pub end: u64,
    /// Allowed access.
    pub prot: Prot,
}

/// The mappings of an address space, by start address; they never overlap.
#[derive(Clone, Debug, Default)]
pub struct VmaMap {
    vmas: BTreeMap<u64, Vma>,
}

impl VmaMap {
    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// Mappings overlapping `[start, end)`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        let first = self.find(start).map_or(start, |v| v.start);
        self.vmas
            .range(first..end)
            .map(|(_, v)| v)
            .filter(move |v| v.end > start)
    }

    /// Adds a mapping; the caller makes sure the range is free.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.start, vma.end).next().is_none());
        self.vmas.insert(vma.start, vma);
    }

    /// Splits the mapping containing `addr` (if any, and if `addr` is inside it) in two.
    pub fn split_at(&mut self, addr: u64) {
        let Some(v) = self.find(addr).copied() else {
            return;
        };
        if v.start == addr {
            return;
        }
        self.vmas.insert(v.start, Vma { end: addr, ..v });
        self.vmas.insert(addr, Vma { start: addr, ..v });
    }

    /// Removes every mapping inside `[start, end)` (split at both ends first), returning
    /// them.
    pub fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.vmas.range(start..end).map(|(k, _)| *k).collect();
        keys.iter().filter_map(|k| self.vmas.remove(k)).collect()
    }

    /// The lowest free gap of `len` bytes at or above `floor` and below `ceiling`.
    pub fn find_gap(&self, len: u64, floor: u64, ceiling: u64) -> Option<u64> {
        let mut candidate = floor;
        for v in self.vmas.values() {
            if v.end <= candidate {
                continue;
            }
            if v.start >= candidate && v.start - candidate >= len {
                break;
            }
            candidate = candidate.max(v.end);
        }
        (candidate.checked_add(len)? <= ceiling).then_some(candidate)
    }

    /// All mappings, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.vmas.len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.vmas.is_empty()
    }
}
