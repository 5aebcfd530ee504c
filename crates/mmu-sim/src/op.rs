//! The operations the checker names in its reports.
//!
//! Every invalidation the primary makes is opened for one operation, and every access a
//! secondary makes through the checker is one too; a [`Violation`](crate::Violation)
//! names the operation whose rule was broken. The names are fixed here once, so a report
//! (text, JSON, a replay file) reads the same wherever it is made.

use std::fmt;

/// A primary operation that invalidates translations, or a secondary's own operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SimOp {
    /// `munmap`: one `Unmap` over the call.
    Munmap,
    /// `mmap` with `MAP_FIXED` over something mapped: an `Unmap` of it first.
    MmapFixed,
    /// `mremap` shrinking: an `Unmap` of the tail.
    MremapShrink,
    /// `mremap` to a fixed target: an `Unmap` of what was mapped there.
    MremapFixed,
    /// `mremap` moving a mapping: an `Unmap` of the old range while the entries move,
    /// then another as the emptied mapping is unmapped.
    MremapMove,
    /// `mprotect`: `ProtectionVma`.
    Mprotect,
    /// `fork`: `ProtectionPage` on the parent over each copied private mapping.
    Fork,
    /// A write fault copying a shared page: `Clear` of the page.
    CowBreak,
    /// A CPU access to a device-exclusive page: `Exclusive` without an owner.
    ExclusiveRestore,
    /// Process exit: `Unmap` over everything.
    Exit,
    /// `madvise(MADV_DONTNEED)`: `Clear` per mapping.
    MadviseDontNeed,
    /// `madvise(MADV_FREE)`: `Clear` per mapping.
    MadviseFree,
    /// Reclaim (kswapd or `MADV_PAGEOUT`): `Clear` per page reclaimed.
    Reclaim,
    /// Migration of one page: `Clear` of the page.
    Migrate,
    /// Migration of a range for a device: one `Migrate` with the device's owner.
    MigrateRange,
    /// Soft-dirty reset: `SoftDirty` over everything.
    SoftDirtyReset,
    /// Device-exclusive access: `Exclusive` of the page with the device's owner.
    MakeExclusive,
    /// The OOM reaper: a non-blockable `Unmap` per private mapping.
    OomReap,
    /// A secondary installs a translation.
    Install,
    /// A secondary reads through a translation.
    Read,
    /// A secondary writes through a translation.
    Write,
}

impl SimOp {
    /// Every operation, in declaration order.
    pub const ALL: [SimOp; 21] = [
        SimOp::Munmap,
        SimOp::MmapFixed,
        SimOp::MremapShrink,
        SimOp::MremapFixed,
        SimOp::MremapMove,
        SimOp::Mprotect,
        SimOp::Fork,
        SimOp::CowBreak,
        SimOp::ExclusiveRestore,
        SimOp::Exit,
        SimOp::MadviseDontNeed,
        SimOp::MadviseFree,
        SimOp::Reclaim,
        SimOp::Migrate,
        SimOp::MigrateRange,
        SimOp::SoftDirtyReset,
        SimOp::MakeExclusive,
        SimOp::OomReap,
        SimOp::Install,
        SimOp::Read,
        SimOp::Write,
    ];

    /// The name reports use (`"cow break"`, `"munmap"`, ...); [`Display`](fmt::Display)
    /// writes it too.
    pub const fn as_str(self) -> &'static str {
        match self {
            SimOp::Munmap => "munmap",
            SimOp::MmapFixed => "mmap fixed",
            SimOp::MremapShrink => "mremap shrink",
            SimOp::MremapFixed => "mremap fixed",
            SimOp::MremapMove => "mremap move",
            SimOp::Mprotect => "mprotect",
            SimOp::Fork => "fork",
            SimOp::CowBreak => "cow break",
            SimOp::ExclusiveRestore => "exclusive restore",
            SimOp::Exit => "exit",
            SimOp::MadviseDontNeed => "madvise dontneed",
            SimOp::MadviseFree => "madvise free",
            SimOp::Reclaim => "reclaim",
            SimOp::Migrate => "migrate",
            SimOp::MigrateRange => "migrate range",
            SimOp::SoftDirtyReset => "soft-dirty reset",
            SimOp::MakeExclusive => "make exclusive",
            SimOp::OomReap => "oom reap",
            SimOp::Install => "install",
            SimOp::Read => "read",
            SimOp::Write => "write",
        }
    }
}

impl fmt::Display for SimOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for SimOp {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SimOp {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_compare_with_their_text() {
        let mut names: Vec<&str> = SimOp::ALL.iter().map(|o| o.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SimOp::ALL.len(), "two operations share a name");
        assert_eq!(SimOp::CowBreak.to_string(), "cow break");
        assert!(SimOp::MadviseDontNeed == "madvise dontneed");
        assert!(SimOp::Munmap != "mremap move");
    }
}
