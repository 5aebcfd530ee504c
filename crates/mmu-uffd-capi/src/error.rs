//! Errors across the C boundary: negative errno values, the per-thread message behind
//! `mmu_uffd_last_error`, and the guard that keeps panics on the Rust side.
//!
//! Every entry point runs its body in [`ffi_call`] (for functions returning `int`) or
//! [`ffi_call_or`] (for accessors returning a value, with a fallback), which catch a
//! panic, record a message for the calling thread and turn the failure into the
//! function's error return.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A failure to report to C: a positive errno value (returned negated) and a message.
#[derive(Debug)]
pub(crate) struct FfiError {
    /// The errno value (positive; the entry point returns `-errno`).
    pub(crate) errno: c_int,
    /// What went wrong, for `mmu_uffd_last_error`.
    pub(crate) message: String,
}

impl FfiError {
    /// An error with this errno value (positive) and message.
    pub(crate) fn new(errno: c_int, message: impl fmt::Display) -> FfiError {
        FfiError {
            errno,
            message: message.to_string(),
        }
    }

    /// `EINVAL` with a message (a bad argument).
    pub(crate) fn invalid(message: impl fmt::Display) -> FfiError {
        FfiError::new(libc::EINVAL, message)
    }

    /// `EINVAL` for a null pointer argument named `what`.
    pub(crate) fn null(what: &str) -> FfiError {
        FfiError::invalid(format_args!("{what} is NULL"))
    }
}

impl From<mmu_uffd::Error> for FfiError {
    fn from(e: mmu_uffd::Error) -> FfiError {
        FfiError::new(errno_of(&e), e)
    }
}

/// The errno value (positive) that stands for `e` in the C API (the table is in the
/// crate documentation and the header).
pub(crate) fn errno_of(e: &mmu_uffd::Error) -> c_int {
    use mmu_uffd::Error as E;
    match e {
        E::Unavailable { .. } => libc::ENOSYS,
        E::MissingFeature { .. } => libc::EOPNOTSUPP,
        E::InvalidRange { .. } => libc::EINVAL,
        E::Watch { source, .. } => source.raw_os_error().unwrap_or(libc::EFAULT),
        E::Stopped { .. } => libc::ESHUTDOWN,
        E::Forked => libc::ECHILD,
        E::OnMonitorThread => libc::EDEADLK,
        E::Subscription(mmu_notifier::IntervalError::Released) => libc::ESHUTDOWN,
        E::Subscription(_) => libc::EINVAL,
        E::Thread(source) => source.raw_os_error().unwrap_or(libc::EAGAIN),
        E::Register { .. } => libc::ECANCELED,
        E::Contended { .. } => libc::EAGAIN,
        _ => libc::EIO,
    }
}

/// The errno value (positive) returned when a panic was caught: a bug in this library.
pub(crate) const PANIC_ERRNO: c_int = libc::ENOTRECOVERABLE;

thread_local! {
    /// The message of the last failed call on this thread.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records `message` as this thread's last error.
pub(crate) fn set_last_error(message: &str) {
    // An interior NUL cannot be represented: cut the message there.
    let bytes: Vec<u8> = message.bytes().take_while(|&b| b != 0).collect();
    let message = CString::new(bytes).unwrap_or_default();
    // Fails only while the thread's locals are being destroyed: nothing to record then.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = Some(message);
        }
    });
}

/// This thread's last error message; valid until the next failed call on this thread
/// (an empty string if no call has failed on it).
pub(crate) fn last_error_ptr() -> *const c_char {
    const NONE: &CStr = c"";
    LAST_ERROR
        .try_with(|slot| match slot.try_borrow() {
            // The CString's heap buffer stays where it is until the slot is overwritten,
            // which only a later failed call on this same thread does.
            Ok(slot) => slot.as_ref().map_or(NONE.as_ptr(), |m| m.as_ptr()),
            Err(_) => NONE.as_ptr(),
        })
        .unwrap_or(NONE.as_ptr())
}

/// Records `e` as this thread's last error and returns `-errno`.
pub(crate) fn fail(e: FfiError) -> c_int {
    set_last_error(&e.message);
    -e.errno.abs().max(1)
}

/// What a caught panic said.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("internal error (a bug in mmu_uffd): panic: {what}")
}

/// Drops a panic payload without letting a panic in its destructor escape.
fn drop_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// Runs an entry point returning `int`: its value (zero or positive) on success; on an
/// error or a panic records the message for this thread and returns `-errno` (a panic is
/// `-ENOTRECOVERABLE`). No panic crosses the boundary.
pub(crate) fn ffi_call(f: impl FnOnce() -> Result<c_int, FfiError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => fail(e),
        Err(payload) => {
            let message = panic_message(&*payload);
            drop_payload(payload);
            fail(FfiError::new(PANIC_ERRNO, message))
        }
    }
}

/// Runs an entry point returning a value: the value on success; on an error or a panic
/// records the message for this thread and returns `fallback`. No panic crosses the
/// boundary.
pub(crate) fn ffi_call_or<T>(fallback: T, f: impl FnOnce() -> Result<T, FfiError>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            fail(e);
            fallback
        }
        Err(payload) => {
            let message = panic_message(&*payload);
            drop_payload(payload);
            fail(FfiError::new(PANIC_ERRNO, message));
            fallback
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_with_a_message() {
        let rc = ffi_call(|| panic!("boom"));
        assert_eq!(rc, -PANIC_ERRNO);
        // SAFETY: the pointer is this thread's message, valid until the next failure here.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) };
        assert!(msg.to_str().unwrap().contains("boom"));
        assert_eq!(ffi_call_or(7u64, || panic!("again")), 7);
    }

    #[test]
    fn errors_are_negative_and_messages_cut_at_nul() {
        assert_eq!(
            ffi_call(|| Err(FfiError::invalid("bad\0tail"))),
            -libc::EINVAL
        );
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) };
        assert_eq!(msg.to_str().unwrap(), "bad");
        assert_eq!(ffi_call(|| Ok(3)), 3);
    }
}
