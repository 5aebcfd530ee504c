//! Virtual addresses and lengths as types.
//!
//! The primary's calls take an address and a length (`munmap`, `mprotect`, `madvise`,
//! `mremap`) or a start and an end (`reclaim`, `age`, `snapshot`, `migrate_range`); passing
//! one where the other belongs compiles with bare integers and silently covers another
//! range. With [`VirtAddr`] and [`Len`] it does not compile: the arithmetic that makes
//! sense is defined (an address plus a length is an address, the difference of two
//! addresses is a length), and nothing else is. The calls accept `u64` too (both types
//! convert from it), so existing callers keep compiling; callers that hold typed values
//! get the checks.

use std::fmt;
use std::ops::{Add, AddAssign, Mul, Sub};

use crate::pagetable::PAGE_SIZE;

/// A virtual address in the simulated process.
///
/// With typed values, a call that takes a length accepts no address, and one that takes
/// an end accepts no length:
///
/// ```
/// use std::sync::Arc;
/// use mmu_sim::{AddressSpace, FrameAllocator, Len, Prot, VirtAddr};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
/// let len = Len::pages(4);
/// let a = VirtAddr::new(mm.mmap_anon(len, Prot::READ_WRITE)?);
/// mm.write(a, 1)?;
/// mm.reclaim(a, a + len)?; // a start and an end
/// mm.munmap(a, len)?; // an address and a length
/// # Ok::<(), mmu_sim::SimError>(())
/// ```
///
/// ```compile_fail
/// use std::sync::Arc;
/// use mmu_sim::{AddressSpace, FrameAllocator, Len, Prot, VirtAddr};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
/// let len = Len::pages(4);
/// let a = VirtAddr::new(mm.mmap_anon(len, Prot::READ_WRITE)?);
/// mm.munmap(a, a + len)?; // an end where the length belongs: does not compile
/// # Ok::<(), mmu_sim::SimError>(())
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtAddr(u64);

/// A length in bytes (of a range of virtual addresses).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Len(u64);

impl VirtAddr {
    /// The address `addr`.
    pub const fn new(addr: u64) -> Self {
        VirtAddr(addr)
    }

    /// The address as an integer.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether the address is the start of a page.
    pub const fn is_page_aligned(self) -> bool {
        self.0 % PAGE_SIZE == 0
    }

    /// The start of the page containing the address.
    pub const fn page_down(self) -> Self {
        VirtAddr(self.0 & !(PAGE_SIZE - 1))
    }

    /// The address plus `len`, or `None` if it overflows.
    pub const fn checked_add(self, len: Len) -> Option<Self> {
        match self.0.checked_add(len.0) {
            Some(a) => Some(VirtAddr(a)),
            None => None,
        }
    }

    /// The length from `start` to this address, or `None` if `start` is above it.
    pub const fn checked_since(self, start: VirtAddr) -> Option<Len> {
        match self.0.checked_sub(start.0) {
            Some(l) => Some(Len(l)),
            None => None,
        }
    }
}

impl Len {
    /// `bytes` bytes.
    pub const fn new(bytes: u64) -> Self {
        Len(bytes)
    }

    /// `n` pages.
    pub const fn pages(n: u64) -> Self {
        Len(n * PAGE_SIZE)
    }

    /// The length in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether the length is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The length rounded up to whole pages, or `None` if that overflows.
    pub const fn page_up(self) -> Option<Self> {
        match self.0.checked_next_multiple_of(PAGE_SIZE) {
            Some(l) => Some(Len(l)),
            None => None,
        }
    }

    /// How many pages the length spans (rounded up).
    pub const fn page_count(self) -> u64 {
        self.0.div_ceil(PAGE_SIZE)
    }
}

impl From<u64> for VirtAddr {
    fn from(addr: u64) -> Self {
        VirtAddr(addr)
    }
}

impl From<VirtAddr> for u64 {
    fn from(addr: VirtAddr) -> u64 {
        addr.0
    }
}

impl From<u64> for Len {
    fn from(bytes: u64) -> Self {
        Len(bytes)
    }
}

impl From<Len> for u64 {
    fn from(len: Len) -> u64 {
        len.0
    }
}

/// An address plus a length (panics on overflow in debug builds, as integers do; the
/// simulation's own calls use [`VirtAddr::checked_add`] on caller input).
impl Add<Len> for VirtAddr {
    type Output = VirtAddr;
    fn add(self, len: Len) -> VirtAddr {
        VirtAddr(self.0 + len.0)
    }
}

impl AddAssign<Len> for VirtAddr {
    fn add_assign(&mut self, len: Len) {
        self.0 += len.0;
    }
}

/// An address less a length.
impl Sub<Len> for VirtAddr {
    type Output = VirtAddr;
    fn sub(self, len: Len) -> VirtAddr {
        VirtAddr(self.0 - len.0)
    }
}

/// The length between two addresses (`end - start`).
impl Sub<VirtAddr> for VirtAddr {
    type Output = Len;
    fn sub(self, start: VirtAddr) -> Len {
        Len(self.0 - start.0)
    }
}

impl Add for Len {
    type Output = Len;
    fn add(self, other: Len) -> Len {
        Len(self.0 + other.0)
    }
}

impl Sub for Len {
    type Output = Len;
    fn sub(self, other: Len) -> Len {
        Len(self.0 - other.0)
    }
}

impl Mul<u64> for Len {
    type Output = Len;
    fn mul(self, n: u64) -> Len {
        Len(self.0 * n)
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Len({:#x})", self.0)
    }
}

impl fmt::Display for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_rounding_and_hex_debug() {
        let a = VirtAddr::new(0x1000);
        let end = a + Len::pages(3);
        assert_eq!(end, VirtAddr::new(0x4000));
        assert_eq!(end - a, Len::new(0x3000));
        assert_eq!(end - Len::pages(1), VirtAddr::new(0x3000));
        assert_eq!(VirtAddr::new(0x1fff).page_down(), a);
        assert!(a.is_page_aligned() && !VirtAddr::new(0x1001).is_page_aligned());
        assert_eq!(Len::new(1).page_up(), Some(Len::pages(1)));
        assert_eq!(Len::new(u64::MAX).page_up(), None);
        assert_eq!(Len::new(0x1001).page_count(), 2);
        assert_eq!(VirtAddr::new(u64::MAX).checked_add(Len::new(1)), None);
        assert_eq!(a.checked_since(end), None);
        assert_eq!(end.checked_since(a), Some(Len::pages(3)));
        let mut c = a;
        c += Len::pages(1) * 2;
        assert_eq!(c, VirtAddr::new(0x3000));
        assert_eq!(
            format!("{a:?} {:?}", Len::pages(2)),
            "VirtAddr(0x1000) Len(0x2000)"
        );
        assert_eq!(format!("{a} {a:#x}"), "0x1000 0x1000");
        assert_eq!(u64::from(end), 0x4000);
    }
}
