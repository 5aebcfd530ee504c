//! The fill helper (`IntervalSubscription::fill`, `LockedIntervalSubscription::fill`,
//! `retry`): a collision costs an attempt, a spent budget is an error, and the install
//! step never runs with a stale sequence (shown against a twin of the helper that skips
//! the check, which the same test catches).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use mmu_notifier::{
    Event, Install, IntervalContext, IntervalGuard, IntervalLock, IntervalLockGuard,
    IntervalSubscriber, IntervalSubscription, LockedIntervalContext, LockedIntervalSubscriber,
    Range, RetryBudget, RetryExhausted, RetryPolicy, Subscriptions, WouldBlock,
};

const P: u64 = 4096;

/// A mirror of one page: the primary's version it copied, if any.
struct Mirror {
    copied: Option<u64>,
}

impl IntervalSubscriber for Mirror {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.copied = None;
        Ok(())
    }
}

/// The primary: a version that an invalidation of `[0, P)` announces changing.
struct Primary {
    mm: Subscriptions,
    version: AtomicU64,
}

impl Primary {
    fn new() -> Self {
        Primary {
            mm: Subscriptions::new(),
            version: AtomicU64::new(1),
        }
    }

    /// Changes the page, announcing it to the subscriptions first (as an unmap does).
    fn change(&self) {
        let guard = self
            .mm
            .invalidate_range_start(Range::new(0, P, Event::Clear).unwrap());
        self.version.fetch_add(1, SeqCst);
        drop(guard);
    }

    fn read(&self) -> u64 {
        self.version.load(SeqCst)
    }
}

/// A policy that changes the primary in the race window of the first `collisions`
/// attempts, and counts windows and retries.
struct Racing<'a> {
    primary: &'a Primary,
    collisions: u32,
    windows: u32,
    budget: RetryBudget,
}

impl<'a> Racing<'a> {
    fn new(primary: &'a Primary, collisions: u32, budget: RetryBudget) -> Self {
        Racing {
            primary,
            collisions,
            windows: 0,
            budget,
        }
    }
}

impl RetryPolicy for Racing<'_> {
    type Error = RetryExhausted;

    fn window(&mut self) {
        self.windows += 1;
        if self.windows <= self.collisions {
            self.primary.change();
        }
    }

    fn again(&mut self) -> Result<(), RetryExhausted> {
        self.budget.again()
    }
}

type Gather<'a> = dyn FnMut() -> Result<u64, RetryExhausted> + 'a;
type InstallFn<'a> =
    dyn FnMut(&mut IntervalGuard<'_, Mirror>, u64) -> Result<Install<u64>, RetryExhausted> + 'a;

type Fill = fn(
    &IntervalSubscription<Mirror>,
    &mut Racing<'_>,
    &mut Gather<'_>,
    &mut InstallFn<'_>,
) -> Result<u64, RetryExhausted>;

/// The helper under test.
fn real_fill(
    sub: &IntervalSubscription<Mirror>,
    policy: &mut Racing<'_>,
    gather: &mut Gather<'_>,
    install: &mut InstallFn<'_>,
) -> Result<u64, RetryExhausted> {
    sub.fill(policy, gather, install)
}

/// A broken twin of the helper: the same loop without `read_retry`.
fn fill_without_check(
    sub: &IntervalSubscription<Mirror>,
    policy: &mut Racing<'_>,
    gather: &mut Gather<'_>,
    install: &mut InstallFn<'_>,
) -> Result<u64, RetryExhausted> {
    loop {
        let _seq = sub.read_begin();
        let got = gather()?;
        policy.window();
        let mut g = sub.lock();
        if let Install::Done(r) = install(&mut g, got)? {
            return Ok(r);
        }
        drop(g);
        policy.again()?;
    }
}

/// Runs one fill that loses the race once, with `fill`; returns an error naming the
/// rule broken, if any: what was installed must be the primary's current version, and
/// the lost attempt must have been retried.
fn check_no_stale_install(fill: Fill) -> Result<(), String> {
    let primary = Primary::new();
    let sub = primary
        .mm
        .insert_interval(0..P, Mirror { copied: None })
        .unwrap();
    let mut policy = Racing::new(&primary, 1, RetryBudget::attempts(10));
    let gathers = Cell::new(0);
    let mut gather = || {
        gathers.set(gathers.get() + 1);
        Ok(primary.read())
    };
    let mut install = |m: &mut IntervalGuard<'_, Mirror>, v: u64| {
        m.copied = Some(v);
        Ok(Install::Done(v))
    };
    let got = fill(&sub, &mut policy, &mut gather, &mut install).map_err(|e| e.to_string())?;
    let now = primary.read();
    if got != now || sub.lock().copied != Some(now) {
        return Err(format!(
            "installed version {got} while the primary is at {now}: a stale install"
        ));
    }
    if gathers.get() != 2 || policy.budget.attempts_lost() != 1 {
        return Err(format!(
            "{} gathers, {} lost attempts; wanted 2 and 1",
            gathers.get(),
            policy.budget.attempts_lost()
        ));
    }
    Ok(())
}

#[test]
fn install_never_runs_with_a_stale_sequence() {
    check_no_stale_install(real_fill).unwrap();
}

#[test]
fn the_check_catches_a_fill_that_skips_read_retry() {
    let err = check_no_stale_install(fill_without_check).unwrap_err();
    assert!(err.contains("stale install"), "{err}");
}

#[test]
fn each_collision_costs_one_attempt_and_one_window() {
    let primary = Primary::new();
    let sub = primary
        .mm
        .insert_interval(0..P, Mirror { copied: None })
        .unwrap();
    let mut policy = Racing::new(&primary, 3, RetryBudget::attempts(10));
    let mut installs = 0;
    let v = sub
        .fill(
            &mut policy,
            || Ok(primary.read()),
            |m, v| {
                installs += 1;
                m.copied = Some(v);
                Ok(Install::Done(v))
            },
        )
        .unwrap();
    assert_eq!(v, 4, "three changes, then the fill that stuck");
    assert_eq!(
        installs, 1,
        "install runs only for the attempt that was not stale"
    );
    assert_eq!(policy.windows, 4);
    assert_eq!(policy.budget.attempts_lost(), 3);
}

#[test]
fn a_spent_budget_is_an_error_and_nothing_is_installed() {
    let primary = Primary::new();
    let sub = primary
        .mm
        .insert_interval(0..P, Mirror { copied: None })
        .unwrap();
    let mut policy = Racing::new(&primary, u32::MAX, RetryBudget::attempts(3));
    let mut installs = 0;
    let r = sub.fill(
        &mut policy,
        || Ok(primary.read()),
        |_, v| {
            installs += 1;
            Ok(Install::Done(v))
        },
    );
    assert_eq!(r, Err(RetryExhausted { attempts: 3 }));
    assert_eq!(installs, 0);
    assert_eq!(policy.windows, 3, "exactly the budget's attempts were made");
    assert_eq!(sub.lock().copied, None);
}

#[test]
fn a_passed_deadline_gives_up_after_the_first_lost_attempt() {
    let primary = Primary::new();
    let sub = primary
        .mm
        .insert_interval(0..P, Mirror { copied: None })
        .unwrap();
    let budget = RetryBudget::timeout(Duration::ZERO);
    assert!(budget.expired());
    let mut policy = Racing::new(&primary, u32::MAX, budget);
    let r = sub.fill(
        &mut policy,
        || Ok(primary.read()),
        |_, v| Ok(Install::Done(v)),
    );
    assert_eq!(r.unwrap_err().attempts, 1);
}

#[test]
fn install_may_refuse_and_that_costs_an_attempt() {
    let mm = Subscriptions::new();
    let sub = mm.insert_interval(0..P, Mirror { copied: None }).unwrap();
    let mut budget = RetryBudget::attempts(5);
    let mut tries = 0;
    let v = sub
        .fill(
            &mut budget,
            || Ok(()),
            |_, ()| {
                tries += 1;
                Ok(if tries < 3 {
                    Install::Retry
                } else {
                    Install::Done(tries)
                })
            },
        )
        .unwrap();
    assert_eq!(v, 3);
    assert_eq!(budget.attempts_lost(), 2);
}

#[test]
fn errors_of_gather_and_install_end_the_fill_at_once() {
    let mm = Subscriptions::new();
    let sub = mm.insert_interval(0..P, Mirror { copied: None }).unwrap();
    let mut budget = RetryBudget::attempts(5).map_err(|_| "exhausted");
    let r: Result<(), _> = sub.fill(&mut budget, || Err("gather"), |_, ()| Ok(Install::Done(())));
    assert_eq!(r, Err("gather"));
    let r: Result<(), _> = sub.fill(&mut budget, || Ok(()), |_, ()| Err("install"));
    assert_eq!(r, Err("install"));
    assert_eq!(budget.budget().attempts_lost(), 0);
    let r: Result<(), _> = sub.fill(&mut budget, || Ok(()), |_, ()| Ok(Install::Retry));
    assert_eq!(
        r,
        Err("exhausted"),
        "the caller's error when the budget runs out"
    );
}

// ----- under a shared lock -------------------------------------------------------------

#[derive(Default)]
struct Table {
    pages: std::collections::BTreeMap<u64, u64>,
}

struct Buffer;

impl LockedIntervalSubscriber for Buffer {
    type State = Table;
    fn invalidate(
        &self,
        t: &mut Table,
        r: &Range,
        _: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        t.pages.retain(|&a, _| !r.overlaps(a, a + P));
        Ok(())
    }
}

#[test]
fn locked_fill_retries_a_collision_and_installs_the_current_version() {
    let primary = Primary::new();
    let lock = IntervalLock::new(Table::default());
    let sub = primary
        .mm
        .insert_locked_interval(0..P, &lock, Buffer)
        .unwrap();
    let mut policy = Racing::new(&primary, 2, RetryBudget::attempts(10));
    let mut installs = 0;
    let v = sub
        .fill(
            &mut policy,
            || Ok(primary.read()),
            |t: &mut IntervalLockGuard<'_, Table>, v| {
                installs += 1;
                t.pages.insert(0, v);
                Ok(Install::Done(v))
            },
        )
        .unwrap();
    assert_eq!(v, primary.read());
    assert_eq!(installs, 1);
    assert_eq!(policy.budget.attempts_lost(), 2);
    assert_eq!(lock.lock().pages.get(&0), Some(&v));
}

#[test]
fn a_fill_over_two_subscriptions_is_lost_if_either_is_invalidated() {
    let primary = Primary::new();
    let lock = IntervalLock::new(Table::default());
    // The primary's changes hit [0, P) only: `far` is never invalidated.
    let far = primary
        .mm
        .insert_locked_interval(8 * P..9 * P, &lock, Buffer)
        .unwrap();
    let near = primary
        .mm
        .insert_locked_interval(0..P, &lock, Buffer)
        .unwrap();
    let mut policy = Racing::new(&primary, 1, RetryBudget::attempts(10));
    let first = far
        .try_fill_with(
            &[&near],
            &mut policy,
            || Ok(primary.read()),
            |_, v| Ok(Install::Done(v)),
        )
        .unwrap();
    assert_eq!(first, None, "the change of `near` makes the attempt lost");
    let second = far
        .try_fill_with(
            &[&near],
            &mut policy,
            || Ok(primary.read()),
            |_, v| Ok(Install::Done(v)),
        )
        .unwrap();
    assert_eq!(second, Some(2));
}

#[test]
fn the_bare_loop_asks_the_policy_between_attempts_only() {
    let mut budget = RetryBudget::attempts(4);
    let mut n = 0;
    let r = mmu_notifier::interval::retry(&mut budget, |_| {
        n += 1;
        Ok(if n == 4 { Some(n) } else { None })
    });
    assert_eq!(r, Ok(4));
    assert_eq!(budget.attempts_lost(), 3);
    let mut budget = RetryBudget::attempts(4);
    let r: Result<u32, _> = mmu_notifier::interval::retry(&mut budget, |_| Ok(None));
    assert_eq!(r, Err(RetryExhausted { attempts: 4 }));
}
