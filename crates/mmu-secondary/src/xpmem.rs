//! XPMEM-style exporter with a remote consumer.
//!
//! # The protocol
//!
//! Three parties, each on its own thread, talk over channels:
//!
//! - The **exporter** (the process that owns the address space) exports ranges of it with
//!   [`Xpmem::export`]. Each export is one interval subscription of the address space. Its
//!   state, behind the subscription's user lock, is the set `remote` of pages it has
//!   *granted* to the consumer (a superset of what the consumer holds in the export).
//! - The **consumer** (the remote node) keeps its own table `page -> FrameRef` behind the
//!   *consumer lock* and serves every request on one thread, one message at a time:
//!   device requests (map, read, write), grants and refusals from the exporter, and
//!   "drop `[start, end)`" orders from invalidations. Every access through its table is
//!   made with the consumer lock held, through [`device_access`].
//! - The **fault server** is the exporter's thread that answers the consumer's "please
//!   fault in `page`" requests. It runs the collision-retry loop of the export's
//!   subscription: `read_begin`, `mm.fault` (may sleep, may wait for the mmap lock),
//!   take the user lock, `read_retry`; on success it records `page` in `remote` and sends
//!   the grant to the consumer *while still holding the user lock*.
//!
//! An **invalidation** reaches the export's `invalidate` (with the user lock held). If
//! `remote` has no page in the range the consumer holds nothing there: return at once.
//! Otherwise, in a blockable range, send the consumer "drop `[start, end)`" and sleep until
//! it acknowledges; then forget those pages in `remote`. So when `invalidate_range_start`
//! returns the consumer holds nothing in the range. In a non-blockable range (the OOM
//! reaper) it cannot sleep for a remote acknowledgement: it answers `WouldBlock` (counted
//! in [`SecondaryStats::would_blocks`]), the primary skips that mapping and retries later;
//! once the consumer has let go of the pages ([`Xpmem::detach`], or a blockable
//! invalidation), the next pass succeeds.
//!
//! Why interval subscriptions and not a list subscriber: the consumer must install nothing
//! in a range between the invalidation's start and its end. A list subscriber whose start
//! can fail (ours does, with `WouldBlock`) must not implement `invalidate_range_end`, so it
//! could not tell when an invalidation is over. The interval protocol tracks exactly that
//! for us: the subscription's sequence is odd from the invalidation's start to its end,
//! `read_begin` waits while it is, and `read_retry` catches an invalidation that ran
//! between `read_begin` and the user lock.
//!
//! # Why a grant can never be stale when the consumer installs it
//!
//! The fault server sends the grant with the user lock held, after `read_retry` said no
//! invalidation of the export ran since `read_begin` (and `read_begin` waited for any that
//! was in progress). Any later invalidation of that page must take the same user lock
//! before it can send its "drop" order, so the order is sent after the grant, on the same
//! FIFO channel: the consumer installs, then drops, then acknowledges, and only then does
//! `invalidate_range_start` return and the primary change the page. The checker verifies
//! it: each install is checked against the primary's entry and the open windows.
//!
//! The requests waiting for a page are answered only when the fault server reports the
//! fault *settled* (a second message, sent once it has let go of the user lock), not at
//! the grant: so a requester never goes on while the fault server still holds a lock its
//! next operation may need (a non-blockable invalidation would then answer `WouldBlock`
//! or not depending on timing), and with one requester the whole exchange is
//! deterministic.
//!
//! # Under a scheduler
//!
//! With [`crate::sched`], a device request carries the requester's task; the fault server
//! runs the fault as that task, and its schedule point (between `mm.fault` and the user
//! lock) is that task's. One request is in flight at a time (others wait at schedule
//! points), so the consumer and the fault server only ever work for the task that holds
//! the scheduler's turn, and their own threads add no nondeterminism.
//!
//! `remote` stays a superset of what the consumer holds: a page enters it before the
//! grant is sent, and leaves it only after the consumer has dropped it: after the
//! acknowledgement of a drop order, or when the fault server handles the consumer's
//! "released" message. Every grant carries an id (kept in `remote` and in the consumer's
//! table), and a release names the grant it releases: the consumer may drop an old grant
//! of a page while a new grant of it is already on its way (a write upgrade), and the
//! release of the old one must not make the exporter forget the new one.
//!
//! # Deadlock analysis
//!
//! The invalidating thread holds the mmap lock (for writing under `munmap`), the export's
//! user lock, and sleeps until the consumer acknowledges. That is safe only if the consumer
//! never waits for any of those, and it does not:
//!
//! - The consumer never faults pages itself. It *asks* the fault server and goes on
//!   serving its queue; the grant arrives later as one more message. So it never touches
//!   the mmap lock (which `munmap` holds while it waits for the consumer's
//!   acknowledgement) and never calls `read_begin` (which waits for that very
//!   invalidation to end). The alternative, a try-lock-and-retry fault on the consumer
//!   thread, would need a try-lock form of every primary operation and would spin while
//!   `munmap` waits; a separate server is simpler and never spins.
//! - The consumer never takes a user lock; the only locks it takes are the consumer lock
//!   and, inside the checker, a page-table lock, each for a bounded time. Sends on the
//!   (unbounded) channels never block.
//! - The fault server may wait for the mmap lock, for `read_begin`, or for the user lock,
//!   all held by an invalidation that waits only for the consumer, which is free. Its own
//!   `mm.fault` may run an invalidation of the export (a write fault breaking COW) on the
//!   fault server's thread; that one too waits only for the consumer. The fault server
//!   holds the user lock only to check, record and send, never while it waits.
//!
//! So every acknowledgement comes, and every wait ends. (The one deliberate exception is
//! [`Xpmem::pause_consumer`], a test hook that makes the consumer a slow remote node.)
//!
//! # Shutdown
//!
//! Dropping the [`Xpmem`] sets a stop flag (which also ends a pause), sends the consumer a
//! shutdown message and joins it. The consumer clears its table *before* its end of the
//! channel goes away (also when unwinding), so an invalidation whose acknowledgement
//! channel is closed, or whose drop order cannot be sent, may return at once: the consumer
//! holds nothing. Then the fault server is stopped and joined (whatever it waits for ends,
//! since nothing waits for the consumer any more), and finally the exports are removed
//! (which may wait for the invalidations in flight to end; they no longer wait for
//! anything).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use mmu_notifier::{Install, Range, WouldBlock};
use mmu_notifier::{IntervalContext, IntervalError, IntervalSubscriber, IntervalSubscription};
use mmu_sim::{AddressSpace, CheckedSecondary, FrameRef, SecondaryKind, PAGE_SIZE};
use parking_lot::{Condvar, Mutex};

use crate::{
    device_access, page_of, report_install, sched, Counters, FaultTimeout, SecondaryError,
    SecondaryMmu, SecondaryStats, Translation,
};

/// How long a caller waits for the consumer to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

const NAME: &str = "xpmem";

/// Names one export of an [`Xpmem`] (returned by [`Xpmem::export`]).
///
/// ```
/// # use std::sync::Arc;
/// # use mmu_sim::{AddressSpace, FrameAllocator, Prot};
/// # use mmu_secondary::xpmem::Xpmem;
/// # let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
/// # let a = mm.mmap_anon(4096, Prot::READ_WRITE)?;
/// let x = Xpmem::new(&mm)?;
/// let id = x.export(a, 4096)?;
/// assert_eq!(x.exports(), vec![(id, a, a + 4096)]);
/// assert!(x.unexport(id));
/// assert!(!x.unexport(id));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportId(pub u64);

/// One translation of the consumer's table, and the id of the grant it came from.
#[derive(Clone, Copy, Debug)]
struct Granted {
    tr: Translation,
    grant: u64,
}

/// What a device request does once the page is mapped.
#[derive(Clone, Copy, Debug)]
enum Op {
    Map,
    Read,
    Write(u64),
}

type Reply = Sender<Result<u64, SecondaryError>>;

/// Messages to the consumer thread.
enum ToConsumer {
    /// A device request from [`SecondaryMmu::fault`] / [`SecondaryMmu::access`].
    Request {
        addr: u64,
        write: bool,
        op: Op,
        reply: Reply,
        /// The scheduler task of the requester, if any (see [`crate::sched`]).
        task: Option<sched::Task>,
    },
    /// The exporter faulted `addr` in for us (grant number `grant`).
    Grant {
        addr: u64,
        frame: FrameRef,
        writable: bool,
        grant: u64,
    },
    /// The fault server is done with the fault of `addr` that it granted: it holds no
    /// lock of the export any more. The requests waiting for the page are served only
    /// now, so a requester never goes on while the fault server still works for it.
    Settled {
        addr: u64,
    },
    /// The exporter could not fault `addr` in (for writing if `write`).
    Refused {
        addr: u64,
        write: bool,
        err: SecondaryError,
    },
    /// An invalidation: drop `[start, end)`, then acknowledge.
    Drop {
        start: u64,
        end: u64,
        ack: Sender<()>,
    },
    /// The consumer unmaps `[start, end)` on its own (xpmem_detach).
    Detach {
        start: u64,
        end: u64,
        reply: Sender<usize>,
    },
    /// Test hook: park until every pause is released (or shutdown).
    Pause {
        parked: Sender<()>,
    },
    Shutdown,
}

/// Messages to the exporter's fault server.
enum ToExporter {
    Fault {
        addr: u64,
        write: bool,
        /// The task of the request that asked, if any: the fault runs as that task.
        task: Option<sched::Task>,
    },
    /// The consumer dropped these (page, grant id) on its own; reply with how many once
    /// `remote` forgets them.
    Released {
        pages: Vec<(u64, u64)>,
        reply: Sender<usize>,
    },
    Stop,
}

/// The consumer's table, behind the consumer lock. The consumer thread uses it as the
/// secondary in its checked installs and accesses.
#[derive(Default)]
struct Remote {
    table: Mutex<BTreeMap<u64, Granted>>,
}

impl Remote {
    /// Drops `[start, end)`; returns what was dropped: (page, grant id).
    fn drop_range(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut t = self.table.lock();
        let gone: Vec<(u64, u64)> = t
            .range(page_of(start)..end)
            .map(|(&a, tr)| (a, tr.grant))
            .collect();
        for (a, _) in &gone {
            t.remove(a);
        }
        gone
    }
}

impl CheckedSecondary for Remote {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        self.table
            .lock()
            .range(page_of(start)..end)
            .map(|(&a, g)| (a, g.tr.frame))
            .collect()
    }
}

/// Pause and stop signals for the consumer.
#[derive(Default)]
struct Control {
    /// Live [`ConsumerPause`]s.
    holds: Mutex<usize>,
    cv: Condvar,
    /// Set (under `holds`) by the drop of the [`Xpmem`].
    stopping: AtomicBool,
}

/// The state of one export, behind its subscription's user lock.
struct ExportState {
    start: u64,
    end: u64,
    /// Pages granted to the consumer and not known to be dropped by it, with the id of
    /// their latest grant.
    remote: BTreeMap<u64, u64>,
    /// Being unexported: grant nothing more.
    closed: bool,
    to_consumer: Sender<ToConsumer>,
    counters: Arc<Counters>,
}

impl IntervalSubscriber for ExportState {
    fn invalidate(
        &mut self,
        range: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.counters.invalidation();
        let start = range.start().max(self.start);
        let end = range.end().min(self.end);
        if self.remote.range(page_of(start)..end).next().is_none() {
            // Nothing granted in the range: the consumer holds nothing there.
            return Ok(());
        }
        if !range.blockable() {
            // Dropping needs a round trip to the consumer: we would have to sleep.
            self.counters.would_block();
            return Err(WouldBlock);
        }
        let (ack, acked) = channel();
        if self
            .to_consumer
            .send(ToConsumer::Drop { start, end, ack })
            .is_ok()
        {
            // Sleeps until the consumer has dropped `[start, end)`. `Err` means the
            // consumer has exited, and it clears its table before its channel closes.
            let _ = acked.recv();
        }
        // Only now, after the acknowledgement, may `remote` forget the pages.
        // Every grant in the range was sent before the drop order (the user lock is held
        // from the check above to here), so the consumer has dropped them all.
        let gone: Vec<u64> = self
            .remote
            .range(page_of(start)..end)
            .map(|(&p, _)| p)
            .collect();
        for p in gone {
            self.remote.remove(&p);
        }
        Ok(())
    }
}

/// One export: its range and its subscription.
struct Export {
    id: ExportId,
    start: u64,
    end: u64,
    sub: IntervalSubscription<ExportState>,
}

type Exports = Arc<Mutex<Vec<Arc<Export>>>>;

/// An XPMEM-style exporter and its remote consumer (see the module docs for the protocol).
///
/// It owns two threads: the consumer, which keeps its own table of the exported pages
/// and makes every device access, and the exporter's fault server, which faults pages in
/// for the consumer. Dropping it stops and joins both, then removes the exports.
///
/// It keeps its address space alive (as XPMEM holds a reference on the exporting mm).
/// Do not drop it, or call [`unexport`](Self::unexport), from inside a notifier callback
/// of the same address space.
///
/// ```
/// use std::sync::Arc;
/// use mmu_sim::{AddressSpace, Checker, FrameAllocator, Prot};
/// use mmu_secondary::{xpmem::Xpmem, SecondaryMmu};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
/// let checker = Checker::new(1);
/// mm.attach_checker(checker.clone()).unwrap();
/// let a = mm.mmap_anon(4 * 4096, Prot::READ_WRITE)?;
/// mm.write(a, 7)?;
///
/// let x = Xpmem::new(&mm)?; // registers itself with the checker
/// x.export(a, 4 * 4096)?;
/// assert_eq!(x.access(a, None)?, 7); // the consumer asks the exporter to fault it in
/// assert_eq!(x.remote_pages(), vec![a]);
///
/// mm.munmap(a, 4 * 4096)?; // waits until the consumer has dropped the page
/// assert!(x.remote_pages().is_empty());
/// assert_eq!(checker.violation_count(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Xpmem {
    /// Weak: see the crate docs (a secondary never keeps its address space alive).
    mm: Weak<AddressSpace>,
    remote: Arc<Remote>,
    counters: Arc<Counters>,
    control: Arc<Control>,
    exports: Exports,
    next_id: AtomicU64,
    /// Under a scheduler: a device request is in flight (see [`Xpmem::request`]).
    in_flight: AtomicBool,
    /// The fault server's fault timeout.
    timeout: Arc<FaultTimeout>,
    to_consumer: Sender<ToConsumer>,
    to_exporter: Sender<ToExporter>,
    consumer: Option<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Xpmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xpmem")
            .field("exports", &self.exports())
            .field("remote_pages", &self.remote.table.lock().len())
            .field("stats", &self.counters.snapshot())
            .finish()
    }
}

impl Xpmem {
    /// Starts an exporter of `mm` with its consumer and fault-server threads, and registers
    /// it with `mm`'s checker if one is attached. Nothing is exported yet.
    ///
    /// Errors: [`SecondaryError::Gone`] if `mm` has exited or a thread cannot be started.
    pub fn new(mm: &Arc<AddressSpace>) -> Result<Arc<Self>, SecondaryError> {
        if mm.has_exited() {
            return Err(SecondaryError::Gone);
        }
        let remote = Arc::new(Remote::default());
        let counters = Arc::new(Counters::default());
        let control = Arc::new(Control::default());
        let exports: Exports = Arc::default();
        let timeout = Arc::new(FaultTimeout::default());
        let (to_consumer, consumer_rx) = channel();
        let (to_exporter, server_rx) = channel();

        let consumer = Consumer {
            mm: Arc::downgrade(mm),
            remote: remote.clone(),
            counters: counters.clone(),
            control: control.clone(),
            rx: consumer_rx,
            to_exporter: to_exporter.clone(),
            pending: HashMap::new(),
            outstanding: HashMap::new(),
        };
        let consumer = std::thread::Builder::new()
            .name("xpmem-consumer".into())
            .spawn(move || consumer.run())
            .map_err(|_| SecondaryError::Gone)?;

        let server = FaultServer {
            mm: Arc::downgrade(mm),
            next_grant: 1,
            exports: exports.clone(),
            counters: counters.clone(),
            timeout: timeout.clone(),
            to_consumer: to_consumer.clone(),
            rx: server_rx,
        };
        let server = match std::thread::Builder::new()
            .name("xpmem-exporter".into())
            .spawn(move || server.run())
        {
            Ok(h) => h,
            Err(_) => {
                let _ = to_consumer.send(ToConsumer::Shutdown);
                let _ = consumer.join();
                return Err(SecondaryError::Gone);
            }
        };

        let x = Arc::new(Xpmem {
            mm: Arc::downgrade(mm),
            remote,
            counters,
            control,
            exports,
            next_id: AtomicU64::new(1),
            in_flight: AtomicBool::new(false),
            timeout,
            to_consumer,
            to_exporter,
            consumer: Some(consumer),
            server: Some(server),
        });
        if let Some(c) = mm.checker() {
            let weak: Weak<dyn CheckedSecondary> = Arc::downgrade(&x) as _;
            c.add_secondary(weak);
        }
        Ok(x)
    }

    /// Exports `[start, start + len)` (widened to whole pages) to the consumer: one
    /// interval subscription.
    ///
    /// Errors: [`SecondaryError::OutOfRange`] for a zero length or a range that overflows;
    /// [`SecondaryError::Gone`] once the address space has been released.
    pub fn export(&self, start: u64, len: u64) -> Result<ExportId, SecondaryError> {
        let bad = SecondaryError::OutOfRange(start);
        if len == 0 {
            return Err(bad);
        }
        let s = page_of(start);
        let e = start
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(bad)?;
        let state = ExportState {
            start: s,
            end: e,
            remote: BTreeMap::new(),
            closed: false,
            to_consumer: self.to_consumer.clone(),
            counters: self.counters.clone(),
        };
        let mm = self.mm.upgrade().ok_or(SecondaryError::Gone)?;
        let sub = mm
            .notifier()
            .insert_interval(s..e, state)
            .map_err(|err| match err {
                IntervalError::Released => SecondaryError::Gone,
                _ => bad,
            })?;
        let id = ExportId(self.next_id.fetch_add(1, Relaxed));
        self.exports.lock().push(Arc::new(Export {
            id,
            start: s,
            end: e,
            sub,
        }));
        Ok(id)
    }

    /// Withdraws an export: grants nothing more from it, makes the consumer drop its
    /// range (waiting for the acknowledgement), then removes the subscription. Returns
    /// false if `id` is not exported.
    pub fn unexport(&self, id: ExportId) -> bool {
        let export = {
            let mut ex = self.exports.lock();
            match ex.iter().position(|e| e.id == id) {
                Some(i) => ex.swap_remove(i),
                None => return false,
            }
        };
        // Close first (under the user lock): a grant sent before this is ahead of the
        // drop order below on the consumer's channel; none is sent after.
        export.sub.lock().closed = true;
        let (ack, acked) = channel();
        let order = ToConsumer::Drop {
            start: export.start,
            end: export.end,
            ack,
        };
        if self.to_consumer.send(order).is_ok() {
            let _ = acked.recv();
        }
        export.sub.lock().remote.clear();
        // The last reference removes the subscription (the fault server may hold one for
        // a moment; it grants nothing from a closed export).
        drop(export);
        true
    }

    /// The exports: id and `[start, end)`.
    pub fn exports(&self) -> Vec<(ExportId, u64, u64)> {
        let mut v: Vec<_> = self
            .exports
            .lock()
            .iter()
            .map(|e| (e.id, e.start, e.end))
            .collect();
        v.sort();
        v
    }

    /// The consumer unmaps its pages in `[start, end)` on its own (like `xpmem_detach`) and
    /// tells the exporter. Returns how many it dropped, once the exporter has forgotten
    /// them (so an OOM reap after this does not have to wait for the consumer there).
    ///
    /// Errors: [`SecondaryError::Timeout`] if the consumer does not answer in time (it is
    /// paused), [`SecondaryError::Gone`] if it has stopped.
    pub fn detach(&self, start: u64, end: u64) -> Result<usize, SecondaryError> {
        let (reply, answer) = channel();
        self.to_consumer
            .send(ToConsumer::Detach { start, end, reply })
            .map_err(|_| SecondaryError::Gone)?;
        match answer.recv_timeout(REPLY_TIMEOUT) {
            Ok(n) => Ok(n),
            Err(RecvTimeoutError::Timeout) => Err(SecondaryError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(SecondaryError::Gone),
        }
    }

    /// The pages the consumer maps now (its table's keys).
    pub fn remote_pages(&self) -> Vec<u64> {
        self.remote.table.lock().keys().copied().collect()
    }

    /// Test hook: makes the consumer a slow remote node. Returns once the consumer is
    /// parked; it serves nothing until every returned guard is dropped, or the `Xpmem` is
    /// dropped. Meanwhile invalidations of pages it holds and [`unexport`](Self::unexport)
    /// wait for it (so do not call them on the thread holding the guard), and device
    /// requests and [`detach`](Self::detach) time out if it stays paused too long.
    ///
    /// Errors: [`SecondaryError::Timeout`] if the consumer does not park in time,
    /// [`SecondaryError::Gone`] if it has stopped.
    pub fn pause_consumer(&self) -> Result<ConsumerPause, SecondaryError> {
        *self.control.holds.lock() += 1;
        // From here on the guard undoes the hold, also on the error paths.
        let guard = ConsumerPause {
            control: self.control.clone(),
        };
        let (parked, is_parked) = channel();
        self.to_consumer
            .send(ToConsumer::Pause { parked })
            .map_err(|_| SecondaryError::Gone)?;
        match is_parked.recv_timeout(REPLY_TIMEOUT) {
            Ok(()) => Ok(guard),
            Err(RecvTimeoutError::Timeout) => Err(SecondaryError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(SecondaryError::Gone),
        }
    }

    /// Sends a device request to the consumer and waits for its answer.
    ///
    /// Under a scheduler ([`crate::sched`]) one request is in flight at a time: the
    /// consumer and the fault server then work for one task only, whose points are the
    /// fault server's, and a task that finds a request in flight waits at schedule points
    /// until it is answered (it would otherwise block holding the scheduler's turn while
    /// the request it waits behind needs that turn to go on). The answer is awaited
    /// without a timeout: time means nothing to a task parked at a point.
    fn request(&self, addr: u64, write: bool, op: Op) -> Result<u64, SecondaryError> {
        let task = sched::current();
        let _in_flight = match task {
            // Acquire: pairs with the Release of the previous request's guard, so what its
            // answer made visible is visible to this request too.
            Some(_) => loop {
                if !self.in_flight.swap(true, Acquire) {
                    break Some(InFlight(&self.in_flight));
                }
                sched::point();
            },
            None => None,
        };
        let (reply, answer) = channel();
        let msg = ToConsumer::Request {
            addr: page_of(addr),
            write,
            op,
            reply,
            task: task.clone(),
        };
        self.to_consumer
            .send(msg)
            .map_err(|_| SecondaryError::Gone)?;
        if task.is_some() {
            return answer.recv().unwrap_or(Err(SecondaryError::Gone));
        }
        match answer.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(SecondaryError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(SecondaryError::Gone),
        }
    }
}

impl CheckedSecondary for Xpmem {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        self.remote.translations_in(start, end)
    }
}

impl SecondaryMmu for Xpmem {
    /// Makes the consumer map `addr` (for writing if `write`), asking the exporter to
    /// fault it in if needed. Errors: [`SecondaryError::OutOfRange`] outside every export,
    /// [`SecondaryError::Primary`] if the primary refuses the fault.
    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        self.request(addr, write, Op::Map).map(|_| ())
    }

    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        let op = write.map_or(Op::Read, Op::Write);
        self.request(addr, write.is_some(), op)
    }

    fn stats(&self) -> SecondaryStats {
        self.counters.snapshot()
    }

    fn timeout_setting(&self) -> &FaultTimeout {
        &self.timeout
    }
}

impl Drop for Xpmem {
    fn drop(&mut self) {
        {
            // Under `holds`, so a consumer about to park cannot miss it.
            let _holds = self.control.holds.lock();
            self.control.stopping.store(true, Release);
            self.control.cv.notify_all();
        }
        let _ = self.to_consumer.send(ToConsumer::Shutdown);
        if let Some(h) = self.consumer.take() {
            let _ = h.join();
        }
        // The consumer is gone and holds nothing: whatever the fault server waits for
        // (the mmap lock, read_begin, a user lock) belongs to invalidations that now
        // return without waiting.
        let _ = self.to_exporter.send(ToExporter::Stop);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        // Remove the subscriptions (each may wait for the invalidations in flight).
        let exports = std::mem::take(&mut *self.exports.lock());
        drop(exports);
    }
}

/// Marks the one request in flight under a scheduler; cleared when dropped.
struct InFlight<'a>(&'a AtomicBool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(false, Release);
    }
}

/// While alive, the consumer of an [`Xpmem`] serves nothing (see
/// [`Xpmem::pause_consumer`]).
///
/// ```
/// # use std::sync::Arc;
/// # use mmu_sim::{AddressSpace, FrameAllocator, Prot};
/// # use mmu_secondary::{xpmem::Xpmem, SecondaryError, SecondaryMmu};
/// # let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
/// # let a = mm.mmap_anon(4096, Prot::READ_WRITE)?;
/// let x = Xpmem::new(&mm)?;
/// x.export(a, 4096)?;
/// let pause = x.pause_consumer()?;
/// // A request now waits in the consumer's queue.
/// drop(pause);
/// assert_eq!(x.access(a, Some(5))?, 5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "the consumer resumes when the pause is dropped"]
pub struct ConsumerPause {
    control: Arc<Control>,
}

impl std::fmt::Debug for ConsumerPause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerPause").finish_non_exhaustive()
    }
}

impl Drop for ConsumerPause {
    fn drop(&mut self) {
        let mut holds = self.control.holds.lock();
        *holds -= 1;
        self.control.cv.notify_all();
    }
}

// ----- the consumer ---------------------------------------------------------------------

/// A device request waiting for its page.
struct Pending {
    write: bool,
    op: Op,
    reply: Reply,
    task: Option<sched::Task>,
}

/// The consumer thread's state.
struct Consumer {
    /// Weak: see the crate docs (a secondary never keeps its address space alive).
    mm: Weak<AddressSpace>,
    remote: Arc<Remote>,
    counters: Arc<Counters>,
    control: Arc<Control>,
    rx: Receiver<ToConsumer>,
    to_exporter: Sender<ToExporter>,
    /// Requests waiting for a grant, per page.
    pending: HashMap<u64, Vec<Pending>>,
    /// Pages with a fault request at the exporter (at most one each): for writing?
    outstanding: HashMap<u64, bool>,
}

/// Clears the consumer's table when the consumer thread leaves, even by unwinding.
struct ClearOnExit(Arc<Remote>);

impl Drop for ClearOnExit {
    fn drop(&mut self) {
        self.0.table.lock().clear();
    }
}

impl Consumer {
    fn run(self) {
        let mut me = self;
        // Declared after `me`, so dropped before it, also when unwinding: the table is
        // cleared before the receiver closes. An invalidation that finds the channel
        // closed may then rely on the consumer holding nothing.
        let clear = ClearOnExit(me.remote.clone());
        while let Ok(msg) = me.rx.recv() {
            if !me.handle(msg) {
                break;
            }
        }
        drop(clear);
        drop(me);
    }

    /// Handles one message; false to stop.
    fn handle(&mut self, msg: ToConsumer) -> bool {
        match msg {
            ToConsumer::Request {
                addr,
                write,
                op,
                reply,
                task,
            } => self.dispatch(
                addr,
                Pending {
                    write,
                    op,
                    reply,
                    task,
                },
            ),
            ToConsumer::Grant {
                addr,
                frame,
                writable,
                grant,
            } => {
                // The address space is gone: nothing to install (the parked requests, asked
                // again when the fault settles, are refused with `Gone`).
                let Some(mm) = self.mm.upgrade() else {
                    return true;
                };
                {
                    let mut t = self.remote.table.lock();
                    report_install(&mm, &*self.remote, addr, frame, writable);
                    t.insert(
                        addr,
                        Granted {
                            tr: Translation { frame, writable },
                            grant,
                        },
                    );
                }
                self.counters.fill();
            }
            ToConsumer::Settled { addr } => {
                self.outstanding.remove(&addr);
                for p in self.pending.remove(&addr).unwrap_or_default() {
                    self.dispatch(addr, p);
                }
            }
            ToConsumer::Refused { addr, write, err } => {
                self.outstanding.remove(&addr);
                for p in self.pending.remove(&addr).unwrap_or_default() {
                    if write && !p.write {
                        // Only a write was refused: a read may still be granted.
                        self.dispatch(addr, p);
                    } else {
                        let _ = p.reply.send(Err(err));
                    }
                }
            }
            ToConsumer::Drop { start, end, ack } => {
                self.remote.drop_range(start, end);
                let _ = ack.send(());
            }
            ToConsumer::Detach { start, end, reply } => {
                let pages = self.remote.drop_range(start, end);
                if pages.is_empty() {
                    let _ = reply.send(0);
                } else {
                    // Dropped first, then told: `remote` stays a superset.
                    let _ = self.to_exporter.send(ToExporter::Released { pages, reply });
                }
            }
            ToConsumer::Pause { parked } => {
                let _ = parked.send(());
                let mut holds = self.control.holds.lock();
                while *holds > 0 && !self.control.stopping.load(Acquire) {
                    self.control.cv.wait(&mut holds);
                }
                return !self.control.stopping.load(Acquire);
            }
            ToConsumer::Shutdown => return false,
        }
        true
    }

    /// Serves a request from the table, or asks the exporter for the page and parks it.
    fn dispatch(&mut self, addr: u64, p: Pending) {
        {
            let t = self.remote.table.lock();
            if let Some(tr) = t
                .get(&addr)
                .map(|g| g.tr)
                .filter(|tr| tr.writable || !p.write)
            {
                let Some(mm) = self.mm.upgrade() else {
                    drop(t);
                    let _ = p.reply.send(Err(SecondaryError::Gone));
                    return;
                };
                // With the consumer lock held: no drop order can be handled meanwhile.
                let v = match p.op {
                    Op::Map => 0,
                    Op::Read => device_access(&mm, &*self.remote, addr, tr.frame, None),
                    Op::Write(v) => device_access(&mm, &*self.remote, addr, tr.frame, Some(v)),
                };
                drop(t);
                if !matches!(p.op, Op::Map) {
                    self.counters.access();
                }
                let _ = p.reply.send(Ok(v));
                return;
            }
        }
        if !self.outstanding.contains_key(&addr) {
            let asked = self.to_exporter.send(ToExporter::Fault {
                addr,
                write: p.write,
                task: p.task.clone(),
            });
            if asked.is_err() {
                let _ = p.reply.send(Err(SecondaryError::Gone));
                return;
            }
            self.outstanding.insert(addr, p.write);
        }
        // A write waiting behind a read request is re-dispatched when the read is granted.
        self.pending.entry(addr).or_default().push(p);
    }
}

// ----- the exporter's fault server ----------------------------------------------------------

struct FaultServer {
    /// Weak: see the crate docs (a secondary never keeps its address space alive).
    mm: Weak<AddressSpace>,
    /// The id of the next grant.
    next_grant: u64,
    exports: Exports,
    counters: Arc<Counters>,
    /// The exporter's fault timeout (shared with the [`Xpmem`] that sets it).
    timeout: Arc<FaultTimeout>,
    to_consumer: Sender<ToConsumer>,
    rx: Receiver<ToExporter>,
}

impl FaultServer {
    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
            match msg {
                ToExporter::Fault { addr, write, task } => {
                    // Runs as the requester's task: its points are that task's.
                    let entered = task.map(sched::enter);
                    // Sent once `fault` has returned: the export's user lock is released.
                    let msg = match self.fault(addr, write) {
                        Ok(()) => ToConsumer::Settled { addr },
                        Err(err) => ToConsumer::Refused { addr, write, err },
                    };
                    drop(entered);
                    let _ = self.to_consumer.send(msg);
                }
                ToExporter::Released { pages, reply } => {
                    let exports: Vec<Arc<Export>> = self.exports.lock().clone();
                    for e in exports {
                        let mut st = e.sub.lock();
                        for (p, grant) in &pages {
                            // Only the grant the consumer dropped, not a newer one.
                            if st.remote.get(p) == Some(grant) {
                                st.remote.remove(p);
                            }
                        }
                    }
                    let _ = reply.send(pages.len());
                }
                ToExporter::Stop => break,
            }
        }
    }

    /// Faults `addr` in for the consumer and sends the grant: the collision-retry loop of
    /// the export covering it.
    fn fault(&mut self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        let export = self
            .exports
            .lock()
            .iter()
            .find(|e| e.start <= addr && addr < e.end)
            .cloned()
            .ok_or(SecondaryError::OutOfRange(addr))?;
        let mut retry = self.timeout.start(Some(&self.counters));
        // `read_begin` (in the fill) waits while an invalidation of this export is in
        // progress; the gather is not in a callback: it may sleep, may wait for the mmap
        // lock.
        export.sub.fill(
            &mut retry,
            || {
                let mm = self.mm.upgrade().ok_or(SecondaryError::Gone)?;
                Ok(mm.fault(addr, write)?)
            },
            |st, frame| {
                if st.closed {
                    return Err(SecondaryError::Gone);
                }
                // Recorded before the grant is sent, and sent with the user lock held: the
                // next invalidation of this export sees the page in `remote`, and its drop
                // order follows the grant on the consumer's FIFO channel.
                let grant = self.next_grant;
                self.next_grant += 1;
                let previous = st.remote.insert(addr, grant);
                let msg = ToConsumer::Grant {
                    addr,
                    frame,
                    writable: write,
                    grant,
                };
                if self.to_consumer.send(msg).is_err() {
                    // The consumer is gone (and holds nothing): undo.
                    match previous {
                        Some(g) => st.remote.insert(addr, g),
                        None => st.remote.remove(&addr),
                    };
                    return Err(SecondaryError::Gone);
                }
                Ok(Install::Done(()))
            },
        )
    }
}
