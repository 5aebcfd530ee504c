//! Errors a caller can get back from the subsystem.

/// Why a list subscriber could not be registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The address space has been released (its process exited): nothing can subscribe.
    #[error("the address space has been released; no new subscriptions are accepted")]
    Released,
    /// Called from inside a callback of the same address space, or while holding one of
    /// its `InvalidateGuard`s: registration waits for in-flight invalidations, so it would
    /// wait for the caller itself.
    #[error(
        "register/get called from inside a notifier callback of the same address space (or \
         while holding one of its InvalidateGuards): it would wait for itself forever"
    )]
    InsideCallback,
}

/// Why [`Subscriptions::get`](crate::Subscriptions::get) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetError {
    /// The shared subscriber already has `limit` users.
    #[error("the shared subscriber already has {limit} users, the most its type allows")]
    TooManyUsers {
        /// The type's [`SharedSubscriber::MAX_USERS`](crate::SharedSubscriber::MAX_USERS).
        limit: u32,
    },
    /// Registering the newly allocated subscriber failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The subscriber's own `alloc` failed.
    #[error("allocating the shared subscriber failed: {0}")]
    Alloc(Box<dyn std::error::Error + Send + Sync>),
}
