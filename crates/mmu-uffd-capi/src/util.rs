//! Checks of the pointers C passes in.

use crate::error::FfiError;

/// `p` as a reference, or `EINVAL` naming `what` if it is NULL.
///
/// # Safety
/// `p` is NULL or points to a live `T` that stays valid and is not freed for `'a`.
pub(crate) unsafe fn obj<'a, T>(p: *const T, what: &str) -> Result<&'a T, FfiError> {
    // SAFETY: by the caller's promise `p` is NULL (None) or valid for `'a`.
    unsafe { p.as_ref() }.ok_or_else(|| FfiError::null(what))
}

/// The out-parameter `p`, set to NULL (so a failure leaves NULL behind), or `EINVAL` naming
/// `what` if `p` itself is NULL.
///
/// # Safety
/// `p` is NULL or points to writable storage for a pointer, not otherwise used while the
/// returned reference lives.
pub(crate) unsafe fn out_slot<'a, T>(
    p: *mut *mut T,
    what: &str,
) -> Result<&'a mut *mut T, FfiError> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and writable by the caller's promise; `write` does not read the old
    // (possibly uninitialized) value, after which the slot holds a valid pointer value.
    unsafe {
        p.write(std::ptr::null_mut());
        Ok(&mut *p)
    }
}
