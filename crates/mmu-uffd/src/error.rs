//! Errors of the monitor and of the registration cache.

use std::io;

/// Why the monitor or the cache refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// userfaultfd cannot be used by this process; `reason` says what each attempt answered
    /// and what usually causes it (permissions, seccomp, kernel configuration).
    #[error("userfaultfd is unavailable: {reason}")]
    Unavailable {
        /// What was tried and what the kernel answered.
        reason: String,
    },
    /// The kernel's userfaultfd lacks a feature the monitor needs.
    #[error("this kernel's userfaultfd lacks {feature}")]
    MissingFeature {
        /// The feature's name and the first Linux version that has it.
        feature: &'static str,
    },
    /// A range was empty, overflowed, or lies outside user space.
    #[error("invalid range {start:#x} + {len:#x}: {reason}")]
    InvalidRange {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The range could not be watched: part of it is not mapped, or its memory type cannot
    /// be registered with userfaultfd (e.g. a file mapping on a kernel without
    /// `WP_ASYNC`, or `VM_PFNMAP`/`VM_IO` memory).
    #[error("cannot watch {start:#x}..{end:#x}: {source}")]
    Watch {
        /// Page-aligned start.
        start: u64,
        /// Page-aligned end.
        end: u64,
        /// The kernel's answer to UFFDIO_REGISTER.
        #[source]
        source: io::Error,
    },
    /// The monitor has stopped (dropped, or its thread failed): nothing can be watched or
    /// cached any more, because invalidations would no longer arrive.
    #[error("the memory monitor has stopped{}", .why.as_deref().map(|w| format!(": {w}")).unwrap_or_default())]
    Stopped {
        /// Why, if it did not stop on request.
        why: Option<String>,
    },
    /// Used in a child process after `fork`: the monitor thread exists only in the parent
    /// and the child's memory is not watched.
    #[error("the monitor belongs to the parent process; this is a forked child (start a new monitor in the child)")]
    Forked,
    /// Called on the monitor thread (from an invalidation callback) while it applies
    /// events: waiting for the batch to end would wait for itself.
    #[error("a lookup from inside an invalidation callback, on the monitor thread, would wait for itself")]
    OnMonitorThread,
    /// The address space refused the cache's interval subscription.
    #[error("cannot subscribe the range: {0}")]
    Subscription(#[source] mmu_notifier::IntervalError),
    /// The monitor thread could not be started.
    #[error("cannot start the monitor thread: {0}")]
    Thread(#[source] io::Error),
    /// The user's register function failed.
    #[error("registration of {start:#x}..{end:#x} failed: {source}")]
    Register {
        /// Start of the range the cache tried to register.
        start: u64,
        /// End of that range.
        end: u64,
        /// The register function's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Every attempt to register the range collided with an invalidation of it (the
    /// memory keeps changing under the caller).
    #[error("{attempts} registrations of {start:#x}..{end:#x} were each invalidated before they could be cached")]
    Contended {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// How many attempts were made.
        attempts: u32,
    },
}
