//! Physical frames: a fixed pool with reference counts, a generation per frame (bumped on
//! every free, so a stale translation is detectable), and one word of data per frame (the
//! "stamp" that lets tests follow a page's contents through copies and migrations).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use parking_lot::Mutex;

use crate::error::SimError;

/// A frame number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pfn(pub u32);

/// A frame as a secondary saw it: its number and the generation it had then. If the frame
/// has been freed since, [`FrameAllocator::generation`] differs and any access through this
/// translation is a use-after-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameRef {
    /// The frame.
    pub pfn: Pfn,
    /// Its generation when the translation was made.
    pub generation: u64,
}

struct Frame {
    refs: AtomicU32,
    generation: AtomicU64,
    data: AtomicU64,
}

/// A pool of frames. Allocation hands out a frame with one reference; [`put`](Self::put)
/// drops one and frees the frame (bumping its generation) when the last goes.
///
/// Frame 0 is the shared zero page ([`ZERO_PAGE`](Self::ZERO_PAGE)): always allocated,
/// never freed, not reference counted (as in Linux). The pool also holds the swap space:
/// reference-counted slots holding one data word each, shared by forked address spaces.
pub struct FrameAllocator {
    frames: Box<[Frame]>,
    free: Mutex<Vec<u32>>,
    swap: Mutex<Swap>,
}

#[derive(Default)]
struct Swap {
    /// (data, references) per slot; a free slot has no references.
    slots: Vec<(u64, u32)>,
    /// The swap cache: slot -> a frame holding its data, with one reference held by the
    /// cache, for slots swapped in while still shared.
    cache: std::collections::HashMap<u32, u32>,
    free: Vec<u32>,
}

impl std::fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("frames", &self.frames.len())
            .field("free", &self.free.lock().len())
            .finish()
    }
}

impl FrameAllocator {
    /// The shared zero page: mapped read-only by read faults on anonymous private memory.
    pub const ZERO_PAGE: Pfn = Pfn(0);

    /// A pool of `n` frames, all free (plus the zero page). At most `u32::MAX - 1`.
    pub fn new(n: u32) -> Self {
        let n = n.min(u32::MAX - 1);
        Self {
            frames: (0..=n)
                .map(|i| Frame {
                    refs: AtomicU32::new(u32::from(i == 0)),
                    generation: AtomicU64::new(0),
                    data: AtomicU64::new(0),
                })
                .collect(),
            // Pop from the end: hand out low numbers first.
            free: Mutex::new((1..=n).rev().collect()),
            swap: Mutex::new(Swap::default()),
        }
    }

    /// Whether `pfn` is the zero page.
    pub fn is_zero_page(pfn: Pfn) -> bool {
        pfn == Self::ZERO_PAGE
    }

    /// Stores `data` in a new swap slot with one reference.
    pub fn swap_store(&self, data: u64) -> u32 {
        let mut s = self.swap.lock();
        match s.free.pop() {
            Some(slot) => {
                s.slots[slot as usize] = (data, 1);
                slot
            }
            None => {
                s.slots.push((data, 1));
                (s.slots.len() - 1) as u32
            }
        }
    }

    /// The data in a swap slot.
    pub fn swap_load(&self, slot: u32) -> u64 {
        self.swap.lock().slots[slot as usize].0
    }

    /// References held on a swap slot.
    pub fn swap_refs(&self, slot: u32) -> u32 {
        self.swap.lock().slots[slot as usize].1
    }

    /// Takes another reference on a swap slot (fork).
    pub fn swap_dup(&self, slot: u32) {
        self.swap.lock().slots[slot as usize].1 += 1;
    }

    /// Drops a reference on a swap slot; the last frees it (and drops its swap-cache
    /// page, if any).
    pub fn swap_put(&self, slot: u32) {
        let mut s = self.swap.lock();
        let e = &mut s.slots[slot as usize];
        assert!(e.1 > 0, "put of a free swap slot {slot}");
        e.1 -= 1;
        let mut cached = None;
        if e.1 == 0 {
            s.free.push(slot);
            cached = s.cache.remove(&slot);
        }
        drop(s);
        if let Some(p) = cached {
            self.put(Pfn(p));
        }
    }

    /// A frame holding the slot's data for a swap-in, with a reference for the caller:
    /// the swap cache's frame if it has one; else a new frame, which the cache keeps too
    /// while other references to the slot remain (so they swap in the same page).
    pub fn swap_in_frame(&self, slot: u32) -> Result<Pfn, SimError> {
        let mut s = self.swap.lock();
        if let Some(&p) = s.cache.get(&slot) {
            self.get(Pfn(p));
            return Ok(Pfn(p));
        }
        let (data, refs) = s.slots[slot as usize];
        let pfn = self.alloc(data)?;
        if refs > 1 {
            self.get(pfn);
            s.cache.insert(slot, pfn.0);
        }
        Ok(pfn)
    }

    /// Swap slots in use.
    pub fn swap_used(&self) -> usize {
        let s = self.swap.lock();
        s.slots.len() - s.free.len()
    }

    /// Allocates a frame holding `data`, with one reference.
    pub fn alloc(&self, data: u64) -> Result<Pfn, SimError> {
        let pfn = self.free.lock().pop().ok_or(SimError::OutOfMemory)?;
        let f = &self.frames[pfn as usize];
        f.data.store(data, Relaxed);
        // Release: the data is visible to whoever learns the frame through its count.
        f.refs.store(1, Release);
        Ok(Pfn(pfn))
    }

    fn frame(&self, pfn: Pfn) -> &Frame {
        &self.frames[pfn.0 as usize]
    }

    /// Takes another reference on an allocated frame (nothing for the zero page).
    pub fn get(&self, pfn: Pfn) {
        if Self::is_zero_page(pfn) {
            return;
        }
        let old = self.frame(pfn).refs.fetch_add(1, Relaxed);
        debug_assert!(old > 0, "get of a free frame {pfn:?}");
    }

    /// Drops a reference; the last one frees the frame and bumps its generation (nothing
    /// for the zero page).
    pub fn put(&self, pfn: Pfn) {
        if Self::is_zero_page(pfn) {
            return;
        }
        let f = self.frame(pfn);
        let old = f.refs.fetch_sub(1, AcqRel);
        assert!(old > 0, "put of a free frame {pfn:?}");
        if old == 1 {
            f.generation.fetch_add(1, Release);
            self.free.lock().push(pfn.0);
        }
    }

    /// References held on the frame (0 when free).
    pub fn refs(&self, pfn: Pfn) -> u32 {
        self.frame(pfn).refs.load(Acquire)
    }

    /// The frame's current generation.
    pub fn generation(&self, pfn: Pfn) -> u64 {
        self.frame(pfn).generation.load(Acquire)
    }

    /// A [`FrameRef`] for the frame as it is now.
    pub fn frame_ref(&self, pfn: Pfn) -> FrameRef {
        FrameRef {
            pfn,
            generation: self.generation(pfn),
        }
    }

    /// Whether a translation made at `r` still names the same allocation.
    pub fn is_current(&self, r: FrameRef) -> bool {
        self.generation(r.pfn) == r.generation && self.refs(r.pfn) > 0
    }

    /// Reads the frame's data word.
    pub fn read(&self, pfn: Pfn) -> u64 {
        self.frame(pfn).data.load(Acquire)
    }

    /// Writes the frame's data word (the zero page stays zero).
    pub fn write(&self, pfn: Pfn, data: u64) {
        if Self::is_zero_page(pfn) {
            return;
        }
        self.frame(pfn).data.store(data, Release);
    }

    /// Frames in the pool, not counting the zero page.
    pub fn capacity(&self) -> usize {
        self.frames.len() - 1
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> usize {
        self.free.lock().len()
    }
}
