//! A small page cache: the pages of a file (or of shared anonymous memory, which Linux
//! backs with a shmem file), created on first use and shared by every mapping of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::error::SimError;
use crate::frame::{FrameAllocator, Pfn};
use crate::pagetable::PAGE_SIZE;

/// A file's pages. The cache holds one reference on each cached frame; every page-table
/// entry mapping it holds another, so a page stays while the file or a mapping has it.
///
/// ```
/// use std::sync::Arc;
/// use mmu_sim::{FrameAllocator, File};
///
/// let file = File::new(Arc::new(FrameAllocator::new(16)));
/// file.write(4096, 7)?; // like pwrite of the page's data word
/// assert_eq!(file.read(4096)?, 7);
/// assert_eq!(file.read(0)?, 0, "holes read as zeroes");
/// # Ok::<(), mmu_sim::SimError>(())
/// ```
pub struct File {
    frames: Arc<FrameAllocator>,
    /// Size in bytes (`u64::MAX`: no limit); faults on pages at or past it raise SIGBUS,
    /// as for a shmem object or a file mapped beyond its end.
    size: AtomicU64,
    /// Page index -> frame.
    pages: Mutex<BTreeMap<u64, Pfn>>,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("cached_pages", &self.pages.lock().len())
            .finish()
    }
}

fn page_index(offset: u64) -> Result<u64, SimError> {
    if offset % PAGE_SIZE != 0 {
        return Err(SimError::InvalidArgument("file offset not page aligned"));
    }
    Ok(offset / PAGE_SIZE)
}

impl File {
    /// An empty file whose pages come from `frames`.
    pub fn new(frames: Arc<FrameAllocator>) -> Arc<Self> {
        Self::with_size(frames, u64::MAX)
    }

    /// An empty file of `size` bytes (like `memfd_create` and `ftruncate`): mappings of
    /// pages at or past the end fault with SIGBUS ([`SimError::Bus`]).
    pub fn with_size(frames: Arc<FrameAllocator>, size: u64) -> Arc<Self> {
        Arc::new(Self {
            frames,
            size: AtomicU64::new(size),
            pages: Mutex::new(BTreeMap::new()),
        })
    }

    /// The size in bytes (`u64::MAX` for a file without limit).
    pub fn size(&self) -> u64 {
        // Relaxed: a plain value; faults that race a resize may see either.
        self.size.load(Relaxed)
    }

    /// Sets the size (like `ftruncate` growing the file; pages already cached stay).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Relaxed);
    }

    /// Whether page `index` lies inside the file.
    pub(crate) fn contains_page(&self, index: u64) -> bool {
        index < self.size() / PAGE_SIZE + u64::from(self.size() % PAGE_SIZE != 0)
    }

    /// The cached frame of page `index`, created (zeroed) if absent, with a new reference
    /// for the caller.
    pub(crate) fn get_page(&self, index: u64) -> Result<Pfn, SimError> {
        let mut pages = self.pages.lock();
        let pfn = match pages.get(&index) {
            Some(&p) => p,
            None => {
                let p = self.frames.alloc(0)?;
                pages.insert(index, p);
                p
            }
        };
        self.frames.get(pfn);
        Ok(pfn)
    }

    /// The cached frame of page `index`, if any (no reference taken).
    pub(crate) fn cached(&self, index: u64) -> Option<Pfn> {
        self.pages.lock().get(&index).copied()
    }

    /// Reads the data word of the page at byte `offset` (page aligned), as `pread` would.
    pub fn read(&self, offset: u64) -> Result<u64, SimError> {
        let index = page_index(offset)?;
        Ok(self
            .pages
            .lock()
            .get(&index)
            .map_or(0, |&p| self.frames.read(p)))
    }

    /// Writes the data word of the page at byte `offset` (page aligned), as `pwrite`
    /// would. Every shared mapping of the page sees it at once.
    pub fn write(&self, offset: u64, value: u64) -> Result<(), SimError> {
        let pfn = self.get_page(page_index(offset)?)?;
        self.frames.write(pfn, value);
        self.frames.put(pfn);
        Ok(())
    }

    /// Pages currently cached.
    pub fn cached_pages(&self) -> usize {
        self.pages.lock().len()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        for (_, pfn) in std::mem::take(&mut *self.pages.lock()) {
            self.frames.put(pfn);
        }
    }
}
