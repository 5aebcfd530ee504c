//! On-demand-paging memory region (registration cache).
//!
//! # The protocol
//!
//! An [`OdpRegion`] is an RDMA on-demand-paging memory region over `[start, end)` of an
//! address space (or a registration cache): nothing is pinned and nothing is subscribed
//! when it is created. A device fault at a page finds the *chunk* covering it, or creates
//! one: an interval subscription over the aligned run of `chunk_pages` pages around the
//! page, clipped to the region, to the mapping (VMA) holding the page, and to the chunks
//! that already exist (so chunks never overlap). Each chunk keeps its own translations
//! (`page -> frame`) behind its subscription's user lock.
//!
//! **Fill** (the collision-retry loop): `s = read_begin()` on the chunk; fault the pages in
//! from the primary with `mm.fault`, one by one (may sleep; no user lock); take the user
//! lock; if the chunk died or no longer covers the pages (an unmap moved it), or
//! `read_retry(s)`, drop what was gathered and start again from the lookup; else install
//! (reporting each install to the checker) and unlock. A fill that keeps colliding gives
//! up with [`SecondaryError::Timeout`].
//!
//! **Invalidate** (user lock held): drop the chunk's translations in the range. For an
//! `Unmap` the pages are gone for good, so the chunk also follows the mapping, from inside
//! the callback, with the safe updates of interval subscriptions (update and split from
//! inside the callback, deferred while the tree is frozen):
//!
//! - the range covers the whole chunk: `remove_self` (the removal never waits; it is marked dead so that a racing fill cannot install in it);
//! - it covers one end: `update_self` shrinks the chunk to the rest;
//! - it punches a hole in the middle: `split_self` keeps the left part and inserts the
//!   right part as a new subscription, carrying the right part's translations, atomically
//!   with respect to invalidations (the library inserts the new half under the same hold
//!   of its lock); the new handle goes into the region's list.
//!
//! Every other event (`Clear`, `ProtectionVma`, `Migrate`, ...) only drops the
//! translations and keeps the chunk: the mapping is still there and the next device fault
//! refills it.
//!
//! The changes queued by `update_self` / `split_self` / `remove_self` take effect when the
//! invalidation ends, and the subscription's sequence is pushed to the invalidation's odd
//! value, so a fill's `read_begin` waits until they have; a fill that raced (read its
//! sequence before the callback ran) fails `read_retry`. The chunk's own `start`/`end`,
//! changed under the user lock in the same callback, is what the fill checks its pages
//! against, so a fill never installs a page outside the chunk's current range.
//!
//! # Locks
//!
//! - A chunk's user lock is taken by its callbacks (by the library) and by fills,
//!   accesses and the checker's `translations_in`.
//! - The region's list of chunk handles is a leaf lock: it is taken (briefly, to push a
//!   split's new half) inside callbacks, under a user lock, so nothing takes a user lock,
//!   waits, or inserts a subscription while holding it. Handles are cloned out first.
//! - Creating a chunk is serialised by a creation lock that callbacks never take; under
//!   it the fault path reads the VMAs (the mmap lock for reading; we are not in a callback)
//!   and inserts the subscription (which, the first time per address space, waits for a
//!   grace period; callbacks do not need the creation lock, so that wait ends).
//!
//! Callbacks never wait: a non-blockable `Unmap` (the OOM reaper) is handled like a
//! blockable one (the updates never sleep); only the library's try-lock of a busy user
//! lock can make it fail there.
//!
//! A race the model accepts: if a concurrent `munmap` of a chunk's range ends between the
//! fault path's VMA lookup and the chunk's insertion, the chunk outlives the mapping. Its
//! fault fails, it holds nothing, and the next `munmap` (or `mmap` over it) of the range
//! removes it. Removed chunks' handles are dropped lazily, by the next lookup or listing.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use mmu_notifier::{
    Event, Install, IntervalContext, IntervalError, IntervalSubscriber, IntervalSubscription,
    Range, WouldBlock,
};
use mmu_sim::{AddressSpace, CheckedSecondary, FrameRef, SecondaryKind, SimError, PAGE_SIZE};
use parking_lot::Mutex;

use crate::{
    device_access, page_of, report_install, Counters, FaultTimeout, SecondaryError, SecondaryMmu,
    SecondaryStats, Translation,
};

/// Pages per chunk of [`OdpRegion::new`]: a fault subscribes the aligned 16-page run
/// around it.
pub const DEFAULT_CHUNK_PAGES: u64 = 16;

/// Most pages per chunk [`OdpRegion::with_chunk_pages`] accepts (larger values are
/// clamped).
pub const MAX_CHUNK_PAGES: u64 = 1 << 20;

/// Fault-then-access rounds before an access gives up.
const ACCESS_ROUNDS: usize = 16;

const NAME: &str = "odp";

type Handle = Arc<IntervalSubscription<Chunk>>;

/// What the region and its chunks share.
struct Shared {
    /// Handles of the chunks (removed ones are pruned lazily). A leaf lock.
    subs: Mutex<Vec<Handle>>,
    counters: Counters,
}

/// One chunk's state, behind its subscription's user lock.
struct Chunk {
    /// The range the chunk covers now, `[start, end)` (the tree catches up when the
    /// current invalidation ends).
    start: u64,
    end: u64,
    pages: BTreeMap<u64, Translation>,
    /// Removed from inside a callback: install nothing.
    dead: bool,
    /// Weak: the region owns the chunks, not the other way round.
    shared: Weak<Shared>,
}

impl Chunk {
    fn drop_range(&mut self, start: u64, end: u64) {
        crate::take_pages(&mut self.pages, start, end);
    }

    fn covers(&self, start: u64, end: u64) -> bool {
        !self.dead && self.start <= start && end <= self.end
    }

    /// Marks the chunk dead and removes it (never waits).
    fn kill(&mut self, ctx: &mut IntervalContext<'_, Self>) {
        self.dead = true;
        self.pages.clear();
        ctx.remove_self();
    }
}

impl IntervalSubscriber for Chunk {
    fn invalidate(
        &mut self,
        range: &Range,
        ctx: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        let shared = self.shared.upgrade();
        if let Some(sh) = &shared {
            sh.counters.invalidation();
        }
        self.drop_range(range.start(), range.end());
        let (s, e) = (range.start(), range.end());
        let (cs, ce) = (self.start, self.end);
        // The tree may still hold a wider, older range of this chunk (a change queued in
        // this frozen period): only the part the chunk covers now matters.
        if range.event() != Event::Unmap || self.dead || e <= cs || ce <= s {
            return Ok(());
        }
        if s <= cs && ce <= e {
            self.kill(ctx);
        } else if s <= cs {
            // The unmap covers the head: keep [e, ce).
            self.start = e;
            if ctx.update_self(e..ce).is_err() {
                self.kill(ctx);
            }
        } else if ce <= e {
            // The unmap covers the tail: keep [cs, s).
            self.end = s;
            if ctx.update_self(cs..s).is_err() {
                self.kill(ctx);
            }
        } else {
            // A hole in the middle: keep [cs, s) here, [e, ce) in a new subscription that
            // takes the translations above the hole with it.
            let right = Chunk {
                start: e,
                end: ce,
                pages: self.pages.split_off(&e),
                dead: false,
                shared: self.shared.clone(),
            };
            self.end = s;
            match ctx.split_self(cs..s, e..ce, right) {
                // Without the region (it is being dropped) the handle is dropped here,
                // which cancels the new half's insertion; that never waits either.
                Ok(h) => {
                    if let Some(sh) = &shared {
                        sh.subs.lock().push(Arc::new(h));
                    }
                }
                Err(_) => self.kill(ctx),
            }
        }
        Ok(())
    }

    fn release(&mut self) {
        self.dead = true;
        self.pages.clear();
    }
}

/// An on-demand-paging memory region over `[start, end)` of an address space, subscribed
/// chunk by chunk as the device faults (see the module docs for the protocol).
///
/// It keeps its address space alive. Dropping it removes every chunk.
///
/// ```
/// use std::sync::Arc;
/// use mmu_sim::{AddressSpace, Checker, FrameAllocator, Prot, PAGE_SIZE};
/// use mmu_secondary::{odp::OdpRegion, SecondaryMmu};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(256)));
/// let checker = Checker::new(2);
/// mm.attach_checker(checker.clone()).unwrap();
/// let a = mm.mmap_anon(64 * PAGE_SIZE, Prot::READ_WRITE)?;
/// let mr = OdpRegion::with_chunk_pages(&mm, a, 64 * PAGE_SIZE, 16)?;
/// assert_eq!(mr.subscription_count(), 0); // nothing until the device faults
///
/// mr.access(a + 5 * PAGE_SIZE, Some(9))?; // device fault, then the write
/// let chunk = (a / (16 * PAGE_SIZE)) * (16 * PAGE_SIZE); // the aligned chunk ...
/// let (lo, hi) = (chunk.max(a), chunk + 16 * PAGE_SIZE); // ... clipped to the mapping
/// assert_eq!(mr.subscription_ranges(), vec![(lo, hi)]);
///
/// mm.munmap(a + 4 * PAGE_SIZE, 2 * PAGE_SIZE)?; // a hole in the middle: split
/// assert_eq!(
///     mr.subscription_ranges(),
///     vec![(lo, a + 4 * PAGE_SIZE), (a + 6 * PAGE_SIZE, hi)]
/// );
/// assert_eq!(checker.violation_count(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct OdpRegion {
    /// Weak: see the crate docs (a secondary never keeps its address space alive).
    mm: Weak<AddressSpace>,
    start: u64,
    end: u64,
    chunk_pages: u64,
    shared: Arc<Shared>,
    /// Serialises chunk creation; never taken by callbacks.
    create: Mutex<()>,
    timeout: FaultTimeout,
}

impl std::fmt::Debug for OdpRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdpRegion")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("chunks", &self.subscription_ranges())
            .field("stats", &self.shared.counters.snapshot())
            .finish()
    }
}

impl OdpRegion {
    /// A region over `[start, start + len)` (widened to whole pages) with chunks of
    /// [`DEFAULT_CHUNK_PAGES`]; registers it with `mm`'s checker if one is attached.
    ///
    /// Errors: [`SecondaryError::OutOfRange`] for a zero length or a range that overflows;
    /// [`SecondaryError::Gone`] if `mm` has exited.
    pub fn new(mm: &Arc<AddressSpace>, start: u64, len: u64) -> Result<Arc<Self>, SecondaryError> {
        Self::with_chunk_pages(mm, start, len, DEFAULT_CHUNK_PAGES)
    }

    /// Like [`new`](Self::new) with chunks of `chunk_pages` pages (clamped to
    /// `1..=`[`MAX_CHUNK_PAGES`]).
    pub fn with_chunk_pages(
        mm: &Arc<AddressSpace>,
        start: u64,
        len: u64,
        chunk_pages: u64,
    ) -> Result<Arc<Self>, SecondaryError> {
        let bad = SecondaryError::OutOfRange(start);
        if len == 0 {
            return Err(bad);
        }
        if mm.has_exited() {
            return Err(SecondaryError::Gone);
        }
        let end = start
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(bad)?;
        let r = Arc::new(OdpRegion {
            mm: Arc::downgrade(mm),
            start: page_of(start),
            end,
            chunk_pages: chunk_pages.clamp(1, MAX_CHUNK_PAGES),
            shared: Arc::new(Shared {
                subs: Mutex::new(Vec::new()),
                counters: Counters::default(),
            }),
            create: Mutex::new(()),
            timeout: FaultTimeout::default(),
        });
        if let Some(c) = mm.checker() {
            let weak: Weak<dyn CheckedSecondary> = Arc::downgrade(&r) as _;
            c.add_secondary(weak);
        }
        Ok(r)
    }

    /// The region, `[start, end)`.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Live chunk handles, pruning the removed ones (dropped outside the list lock).
    fn live(&self) -> Vec<(Handle, (u64, u64))> {
        let mut out = Vec::new();
        let gone: Vec<Handle> = {
            let mut subs = self.shared.subs.lock();
            let mut gone = Vec::new();
            for h in std::mem::take(&mut *subs) {
                match h.range() {
                    Some(r) => {
                        out.push((h.clone(), (r.start, r.end)));
                        subs.push(h);
                    }
                    None => gone.push(h),
                }
            }
            gone
        };
        drop(gone);
        out
    }

    /// The chunk covering `page`, if any.
    fn lookup(&self, page: u64) -> Option<Handle> {
        self.live()
            .into_iter()
            .find(|(_, (s, e))| *s <= page && page < *e)
            .map(|(h, _)| h)
    }

    /// The chunk covering `page`, created if there is none.
    fn lookup_or_create(&self, mm: &AddressSpace, page: u64) -> Result<Handle, SecondaryError> {
        if let Some(h) = self.lookup(page) {
            return Ok(h);
        }
        let _creating = self.create.lock();
        let live = self.live();
        if let Some((h, _)) = live.iter().find(|(_, (s, e))| *s <= page && page < *e) {
            return Ok(h.clone());
        }
        let chunk = self.chunk_pages * PAGE_SIZE;
        let mut lo = (page / chunk * chunk).max(self.start);
        let mut hi = (page / chunk * chunk).saturating_add(chunk).min(self.end);
        // Not in a callback: reading the layout (the mmap lock) is allowed here.
        let vma = mm
            .vmas()
            .into_iter()
            .find(|v| v.start <= page && page < v.end)
            .ok_or(SecondaryError::Primary(SimError::Fault(page)))?;
        lo = lo.max(vma.start);
        hi = hi.min(vma.end);
        for (_, (s, e)) in &live {
            if *e <= page {
                lo = lo.max(*e);
            } else if *s > page {
                hi = hi.min(*s);
            }
        }
        let state = Chunk {
            start: lo,
            end: hi,
            pages: BTreeMap::new(),
            dead: false,
            shared: Arc::downgrade(&self.shared),
        };
        let sub = mm
            .notifier()
            .insert_interval(lo..hi, state)
            .map_err(|e| match e {
                IntervalError::Released => SecondaryError::Gone,
                _ => SecondaryError::OutOfRange(page),
            })?;
        let h = Arc::new(sub);
        self.shared.subs.lock().push(h.clone());
        Ok(h)
    }

    /// The address space, for one operation ([`Gone`](SecondaryError::Gone) once dropped).
    fn mm(&self) -> Result<Arc<AddressSpace>, SecondaryError> {
        self.mm.upgrade().ok_or(SecondaryError::Gone)
    }

    fn check(&self, addr: u64) -> Result<u64, SecondaryError> {
        if addr < self.start || addr >= self.end {
            return Err(SecondaryError::OutOfRange(addr));
        }
        Ok(page_of(addr))
    }

    /// A device fault over up to `pages` pages from `addr` (at least one; stops at the end
    /// of the chunk covering `addr`, of the region, or at the first page the primary
    /// refuses after the first): makes them accessible (writable if `write`). Returns how
    /// many pages were installed.
    ///
    /// Errors: [`SecondaryError::OutOfRange`] outside the region,
    /// [`SecondaryError::Primary`] if the primary refuses the first page,
    /// [`SecondaryError::Timeout`] if invalidations keep colliding,
    /// [`SecondaryError::Gone`] once the address space is released.
    pub fn fault_pages(&self, addr: u64, pages: u64, write: bool) -> Result<usize, SecondaryError> {
        let page = self.check(addr)?;
        let mm = self.mm()?;
        let want_end = page
            .saturating_add(pages.max(1).saturating_mul(PAGE_SIZE))
            .min(self.end);
        let mut retry = self.timeout.start(Some(&self.shared.counters));
        mmu_notifier::interval::retry(&mut retry, |retry| {
            let sub = self.lookup_or_create(&mm, page)?;
            // Gather without the user lock (the primary may sleep).
            let gather = || {
                let Some(covered) = sub.range() else {
                    // Removed since the lookup: the next lookup drops it.
                    return Ok(None);
                };
                let end = want_end.min(covered.end);
                let mut got: Vec<(u64, FrameRef)> = Vec::new();
                for a in (page..end).step_by(PAGE_SIZE as usize) {
                    match mm.fault(a, write) {
                        Ok(f) => got.push((a, f)),
                        Err(e) if got.is_empty() => return Err(e.into()),
                        Err(_) => break,
                    }
                }
                Ok(Some(got))
            };
            sub.try_fill(retry, gather, |c, got| {
                let Some(got) = got else {
                    return Ok(Install::Retry);
                };
                // The chunk may have shrunk (or died) since: install only what it covers.
                let got_end = page + got.len() as u64 * PAGE_SIZE;
                if !c.covers(page, got_end) {
                    return Ok(Install::Retry);
                }
                for &(a, frame) in &got {
                    report_install(&mm, self, a, frame, write);
                    c.pages.insert(
                        a,
                        Translation {
                            frame,
                            writable: write,
                        },
                    );
                    self.shared.counters.fill();
                }
                Ok(Install::Done(got.len()))
            })
        })
    }

    /// How many chunk subscriptions the region has.
    pub fn subscription_count(&self) -> usize {
        self.live().len()
    }

    /// The chunks' ranges, `[start, end)`, sorted (a change queued by an invalidation
    /// that is still running is shown as it will be).
    pub fn subscription_ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.live().into_iter().map(|(_, r)| r).collect();
        v.sort_unstable();
        v
    }

    /// The translations the device holds, per chunk: chunk `[start, end)` and its mapped
    /// pages, sorted.
    pub fn chunk_pages(&self) -> Vec<((u64, u64), Vec<u64>)> {
        let mut v: Vec<_> = self
            .live()
            .into_iter()
            .map(|(h, r)| (r, h.lock().pages.keys().copied().collect()))
            .collect();
        v.sort_unstable();
        v
    }
}

impl CheckedSecondary for OdpRegion {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        let subs: Vec<Handle> = self.shared.subs.lock().clone();
        let mut out = Vec::new();
        for h in subs {
            let c = h.lock();
            out.extend(
                c.pages
                    .range(page_of(start)..end)
                    .map(|(&a, t)| (a, t.frame)),
            );
        }
        out
    }
}

impl SecondaryMmu for OdpRegion {
    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        self.fault_pages(addr, 1, write).map(|_| ())
    }

    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        let page = self.check(addr)?;
        let mm = self.mm()?;
        for _ in 0..ACCESS_ROUNDS {
            if let Some(sub) = self.lookup(page) {
                let c = sub.lock();
                let usable = c.pages.get(&page).copied().filter(|t| {
                    c.covers(page, page + PAGE_SIZE) && (t.writable || write.is_none())
                });
                if let Some(t) = usable {
                    // With the user lock held: no invalidation of the chunk runs meanwhile.
                    let v = device_access(&mm, self, page, t.frame, write);
                    drop(c);
                    self.shared.counters.access();
                    return Ok(v);
                }
            }
            self.fault_pages(page, 1, write.is_some())?;
        }
        Err(SecondaryError::Timeout)
    }

    fn stats(&self) -> SecondaryStats {
        self.shared.counters.snapshot()
    }

    fn timeout_setting(&self) -> &FaultTimeout {
        &self.timeout
    }
}

impl Drop for OdpRegion {
    fn drop(&mut self) {
        // Taken out first, dropped outside the list lock: each drop removes a chunk
        // (never waiting; its release may take its user lock).
        let subs = std::mem::take(&mut *self.shared.subs.lock());
        drop(subs);
    }
}
