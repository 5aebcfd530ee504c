//! The baton: runs the torture's workers one at a time and decides, at every schedule
//! point, which of them runs next.
//!
//! # The protocol
//!
//! Every worker is a task of one [`Baton`]. Exactly one task holds the baton at a time
//! (`current`); the others wait on the condition variable until `current` names them. A
//! task passes the baton only at a schedule point: the start of each of its operations,
//! and the points inside the secondaries' faults (between reading the primary and
//! installing, see `mmu_secondary::sched`), where it holds no lock another task needs.
//! Helper threads of a secondary (XPMEM's fault server) run as the task that asked them,
//! while that task's own thread waits for their answer: still one task at a time.
//!
//! At each point the baton decides which live task runs next (possibly the same one).
//! With one live task there is nothing to decide and nothing is recorded. Otherwise the
//! decision is drawn from a generator seeded by the run's seed, or, when replaying, read
//! from a recorded schedule; either way it is appended to the log, run-length encoded
//! (task, how many decisions in a row). A task that leaves passes the baton the same way.
//!
//! Everything a task does between two points is a function of the state the previous
//! steps left, so the log, the seed and the options determine the whole run: the same
//! operations take effect in the same order, down to which invalidation lands between a
//! fault's read and its install.

use std::sync::{Condvar, Mutex};

use mmu_secondary::sched::Scheduler;

use super::Rng;

/// Decisions, run-length encoded: (task, count).
pub type Runs = Vec<(u32, u32)>;

struct State {
    current: usize,
    live: Vec<bool>,
    rng: Rng,
    log: Runs,
    /// When replaying: the recorded decisions, the run being read and how many of it
    /// are used.
    replay: Option<(Runs, usize, u32)>,
    decisions: u64,
    /// Set when a recorded decision could not be followed.
    diverged: Option<String>,
}

impl State {
    fn push(&mut self, task: usize) {
        let task = task as u32;
        match self.log.last_mut() {
            Some((t, n)) if *t == task && *n < u32::MAX => *n += 1,
            _ => self.log.push((task, 1)),
        }
    }

    /// The next task to run among the live ones (`None` when none is left).
    fn decide(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.live.len()).filter(|&t| self.live[t]).collect();
        match live.len() {
            0 => return None,
            1 => return Some(live[0]),
            _ => {}
        }
        self.decisions += 1;
        let recorded = match &mut self.replay {
            Some((runs, at, used)) => match runs.get(*at) {
                Some(&(t, n)) => {
                    *used += 1;
                    if *used >= n {
                        *at += 1;
                        *used = 0;
                    }
                    Some(t as usize)
                }
                None => {
                    self.diverged.get_or_insert_with(|| {
                        format!(
                            "the recorded schedule ends before decision {}",
                            self.decisions
                        )
                    });
                    None
                }
            },
            None => None,
        };
        let next = match recorded {
            Some(t) if live.contains(&t) => t,
            Some(t) => {
                self.diverged.get_or_insert_with(|| {
                    format!(
                        "decision {} names task {t}, which is not running",
                        self.decisions
                    )
                });
                live[self.rng.below(live.len() as u64) as usize]
            }
            None => live[self.rng.below(live.len() as u64) as usize],
        };
        self.push(next);
        Some(next)
    }
}

/// The baton (see the module docs).
pub struct Baton {
    state: Mutex<State>,
    /// One per task: signalled when the baton passes to it (only its thread wakes).
    turn: Vec<Condvar>,
    /// Called by the task holding the baton at each of its points, before the decision.
    at_point: Box<dyn Fn(usize) + Send + Sync>,
}

impl Baton {
    /// A baton for `tasks` tasks, deciding from `seed`, or following `replay`.
    pub fn new(
        tasks: usize,
        seed: u64,
        replay: Option<Runs>,
        at_point: Box<dyn Fn(usize) + Send + Sync>,
    ) -> Self {
        Baton {
            state: Mutex::new(State {
                current: 0,
                live: vec![true; tasks],
                rng: Rng::new(seed ^ 0x5c4e_d01e),
                log: Vec::new(),
                replay: replay.map(|r| (r, 0, 0)),
                decisions: 0,
                diverged: None,
            }),
            turn: (0..tasks).map(|_| Condvar::new()).collect(),
            at_point,
        }
    }

    /// Waits until `task` holds the baton.
    pub fn wait_turn(&self, task: usize) {
        let mut s = self.state.lock().unwrap();
        while s.current != task {
            s = self.turn[task].wait(s).unwrap();
        }
    }

    /// `task` (holding the baton) leaves for good and passes the baton on.
    pub fn leave(&self, task: usize) {
        let mut s = self.state.lock().unwrap();
        s.live[task] = false;
        if let Some(next) = s.decide() {
            s.current = next;
            self.turn[next].notify_all();
        }
    }

    /// The decisions made, run-length encoded, and the divergence from a replayed
    /// schedule, if any.
    pub fn finish(&self) -> (Runs, Option<String>) {
        let mut s = self.state.lock().unwrap();
        (std::mem::take(&mut s.log), s.diverged.take())
    }
}

impl Scheduler for Baton {
    fn point(&self, task: usize) {
        (self.at_point)(task);
        let mut s = self.state.lock().unwrap();
        let Some(next) = s.decide() else { return };
        if next == task {
            return;
        }
        s.current = next;
        self.turn[next].notify_all();
        while s.current != task {
            s = self.turn[task].wait(s).unwrap();
        }
    }
}

/// The schedule as text: `task.count` tokens, 16 to a line.
pub fn encode(runs: &Runs) -> String {
    let mut out = String::new();
    for (i, (t, n)) in runs.iter().enumerate() {
        out.push_str(&format!("{t}.{n}"));
        out.push(if i % 16 == 15 { '\n' } else { ' ' });
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Parses the tokens of [`encode`].
pub fn decode(text: &str) -> Result<Runs, String> {
    text.split_whitespace()
        .map(|tok| {
            let (t, n) = tok
                .split_once('.')
                .ok_or_else(|| format!("bad schedule entry {tok:?} (expected TASK.COUNT)"))?;
            let t = t
                .parse()
                .map_err(|_| format!("bad task in schedule entry {tok:?}"))?;
            let n = n
                .parse()
                .map_err(|_| format!("bad count in schedule entry {tok:?}"))?;
            Ok((t, n))
        })
        .collect()
}
