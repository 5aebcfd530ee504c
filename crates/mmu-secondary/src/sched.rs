//! Schedule points: where a device fault may lose a race, so that a tool can interleave
//! the race deterministically.
//!
//! # The protocol
//!
//! A fault of a secondary reads the primary, then installs what it read under its own
//! lock, unless an invalidation collided meanwhile. The window between the read and the
//! install is where every collision-retry bug lives. Each secondary of this crate calls
//! [`point`] in that window (and between two attempts of a fault that lost a race), with
//! no lock of its own held, no page-table lock and no invalidation in progress on the
//! calling thread.
//!
//! A thread that runs as a task of a [`Scheduler`] ([`enter`]) hands control to the
//! scheduler at each point: the scheduler may run other tasks (primary operations, other
//! faults) before it lets this one go on. When a scheduler runs one task at a time and
//! decides deterministically (from a seed, or from a recorded schedule) which task runs
//! at each point, the whole interleaving, and with it every race a secondary can lose, is
//! a function of those decisions: a run can be replayed exactly.
//!
//! A secondary that does its work on threads of its own (XPMEM's fault server) runs that
//! work as the task that asked for it: the request carries the [`Task`] ([`current`]), the
//! helper thread [`enter`]s it while it works, and its points are that task's points.
//!
//! Under a scheduler, time means nothing: a task parked at a point may wait for any number
//! of other tasks' steps, so the secondaries' fault deadlines are ignored
//! ([`expired`] is false) and their waits for helper threads are untimed.
//!
//! Without a scheduler (the default) [`point`] does nothing.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

/// Decides which task runs at each schedule point.
pub trait Scheduler: Send + Sync {
    /// Called on a thread running as task `task`, at a schedule point; returns when
    /// `task` may go on. Must not be called with locks held that other tasks need.
    fn point(&self, task: usize);
}

/// A task of a [`Scheduler`]: what a thread runs as.
#[derive(Clone)]
pub struct Task {
    scheduler: Arc<dyn Scheduler>,
    id: usize,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("id", &self.id).finish()
    }
}

impl Task {
    /// Task `id` of `scheduler`.
    pub fn new(scheduler: Arc<dyn Scheduler>, id: usize) -> Self {
        Task { scheduler, id }
    }

    /// Its number.
    pub fn id(&self) -> usize {
        self.id
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Task>> = const { RefCell::new(None) };
}

/// Runs the current thread as `task` until the guard is dropped (then as what it ran as
/// before).
pub fn enter(task: Task) -> Entered {
    let previous = CURRENT.with(|c| c.borrow_mut().replace(task));
    Entered { previous }
}

/// Undoes an [`enter`] when dropped.
#[must_use = "the thread stops running as the task when this is dropped"]
pub struct Entered {
    previous: Option<Task>,
}

impl std::fmt::Debug for Entered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entered").finish_non_exhaustive()
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// The task the current thread runs as, if any.
pub fn current() -> Option<Task> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Whether the current thread runs as a task of a scheduler.
pub fn active() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// A schedule point: under a scheduler, lets it run other tasks first; else nothing.
pub fn point() {
    // Cloned out of the cell: the scheduler may run for long, and the cell must not stay
    // borrowed meanwhile.
    if let Some(task) = current() {
        task.scheduler.point(task.id);
    }
}

/// Whether a fault's `deadline` has passed; never under a scheduler (see the module docs).
pub fn expired(deadline: Instant) -> bool {
    !active() && Instant::now() >= deadline
}
