//! The errors Linux would return, as types.

/// Why a primary-MMU operation failed (the errno Linux would give, in parentheses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// Unaligned, zero-length or overflowing range (EINVAL).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// No frame or no address-space room left (ENOMEM).
    #[error("out of memory")]
    OutOfMemory,
    /// No mapping at the address (EFAULT, or SIGSEGV with SEGV_MAPERR).
    #[error("bad address {0:#x}: not mapped")]
    Fault(u64),
    /// The page cannot be moved or taken now: shared with another owner, not present,
    /// or the zero page (EBUSY).
    #[error("page at {0:#x} is busy")]
    Busy(u64),
    /// The page lies past the end of the file or shared memory object the mapping maps
    /// (SIGBUS; EFAULT from a system call).
    #[error("bus error at {0:#x}: past the end of the mapped object")]
    Bus(u64),
    /// The mapping does not allow the access (EACCES, or SIGSEGV with SEGV_ACCERR).
    #[error("permission denied at {0:#x}")]
    Permission(u64),
}
