//! Replay files: what makes a scheduled torture run reproducible, as text.
//!
//! ```text
//! # mmn replay v1
//! seed 1
//! threads 2
//! secondaries kvm,sva,hmm,xpmem,odp
//! broken ignores-retry
//! hot 4
//! keep_going false
//! ops 1234
//! violations 3
//! first 1200 stale_translation 0x7f0000001000 ignores-retry install
//! schedule 2
//! 0.3 1.2
//! ```
//!
//! The options fix what each worker draws; `ops` is the number of operations the run
//! started (a replay starts exactly as many, so it ends where the run ended whatever
//! stopped it: its budget, its first violation or Ctrl-C); the schedule (after the line
//! `schedule RUNS`, tokens `WORKER.COUNT`) fixes the order in which the workers' steps
//! took effect. `first` is what the run found first (`first none` if nothing), for the
//! replay to compare with: operation number, kind, page address, secondary, operation.

use mmu_secondary::broken::Broken;

use super::schedule::{decode, encode, Runs};
use super::{snake_key, Budget, FirstViolation, TortureOptions, TortureReport};

/// The first line of every replay file.
pub const MAGIC: &str = "# mmn replay v1";

/// The first violation as recorded: (operation number, kind, address, secondary, op).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The operation's number.
    pub op_index: u64,
    /// The kind, snake_case.
    pub kind: String,
    /// The page address.
    pub addr: u64,
    /// The secondary's name.
    pub secondary: String,
    /// The operation the checker named, snake_case.
    pub op: String,
}

impl Recorded {
    /// From a run's first violation.
    pub fn of(f: &FirstViolation) -> Self {
        Recorded {
            op_index: f.op_index,
            kind: snake_key(&format!("{:?}", f.violation.kind)),
            addr: f.violation.addr,
            secondary: f.violation.secondary.clone(),
            op: snake_key(f.violation.op.as_str()),
        }
    }
}

impl std::fmt::Display for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "operation #{}: {} by {} at {:#x} during {}",
            self.op_index, self.kind, self.secondary, self.addr, self.op
        )
    }
}

/// A parsed replay file.
#[derive(Clone, Debug)]
pub struct ReplayFile {
    /// The options to re-run with (budget: the recorded number of operations).
    pub options: TortureOptions,
    /// Violations the run found.
    pub violations: u64,
    /// Its first violation.
    pub first: Option<Recorded>,
}

/// The replay file of a scheduled run (`None` for a parallel run: nothing to replay
/// exactly).
pub fn write(o: &TortureOptions, r: &TortureReport) -> Option<String> {
    let schedule = r.schedule.as_ref()?;
    let mut out = format!("{MAGIC}\n");
    out.push_str(&format!("seed {}\n", o.seed));
    out.push_str(&format!("threads {}\n", o.threads));
    out.push_str(&format!(
        "secondaries {}\n",
        if o.secondaries.is_empty() {
            "-".to_string()
        } else {
            o.secondaries.join(",")
        }
    ));
    out.push_str(&format!("broken {}\n", o.broken.map_or("-", |b| b.name())));
    out.push_str(&format!("hot {}\n", o.hot));
    out.push_str(&format!("keep_going {}\n", o.keep_going));
    out.push_str(&format!("ops {}\n", r.total_ops()));
    out.push_str(&format!("violations {}\n", r.violation_count));
    match r.first.as_ref().map(Recorded::of) {
        Some(f) => out.push_str(&format!(
            "first {} {} {:#x} {} {}\n",
            f.op_index, f.kind, f.addr, f.secondary, f.op
        )),
        None => out.push_str("first none\n"),
    }
    out.push_str(&format!("schedule {}\n", schedule.len()));
    out.push_str(&encode(schedule));
    Some(out)
}

/// Parses a replay file (its first line must be [`MAGIC`]).
pub fn parse(text: &str) -> Result<ReplayFile, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, l)) if l.trim_end() == MAGIC => {}
        _ => return Err("not an mmn replay file".into()),
    }
    let mut fields = std::collections::BTreeMap::new();
    let mut schedule: Option<Runs> = None;
    while let Some((n, line)) = lines.next() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key == "schedule" {
            let rest: Vec<&str> = lines.by_ref().map(|(_, l)| l).collect();
            let runs = decode(&rest.join(" "))?;
            let want: usize = value
                .parse()
                .map_err(|_| format!("line {}: bad schedule length {value:?}", n + 1))?;
            if runs.len() != want {
                return Err(format!(
                    "the schedule has {} entries, its header says {want} (truncated file?)",
                    runs.len()
                ));
            }
            schedule = Some(runs);
            break;
        }
        fields.insert(key.to_string(), (n + 1, value.to_string()));
    }
    let get = |k: &str| {
        fields
            .get(k)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("missing `{k}` line"))
    };
    let num = |k: &str| -> Result<u64, String> {
        let v = get(k)?;
        v.parse()
            .map_err(|_| format!("line {}: bad {k} {v:?}", fields[k].0))
    };
    let schedule = schedule.ok_or("missing `schedule` section")?;
    let secondaries = match get("secondaries")? {
        "-" => Vec::new(),
        s => s.split(',').map(str::to_string).collect(),
    };
    let broken = match get("broken")? {
        "-" => None,
        b => Some(Broken::from_name(b).ok_or_else(|| format!("unknown broken secondary {b:?}"))?),
    };
    let keep_going = match get("keep_going")? {
        "true" => true,
        "false" => false,
        v => return Err(format!("bad keep_going {v:?}")),
    };
    let threads = num("threads")?;
    if !(1..=256).contains(&threads) {
        return Err(format!("bad threads {threads}"));
    }
    let first = match get("first")? {
        "none" => None,
        v => {
            let p: Vec<&str> = v.split_whitespace().collect();
            let [idx, kind, addr, secondary, op] = p[..] else {
                return Err(format!("bad first violation {v:?}"));
            };
            Some(Recorded {
                op_index: idx
                    .parse()
                    .map_err(|_| format!("bad operation number {idx:?}"))?,
                kind: kind.to_string(),
                addr: u64::from_str_radix(addr.trim_start_matches("0x"), 16)
                    .map_err(|_| format!("bad address {addr:?}"))?,
                secondary: secondary.to_string(),
                op: op.to_string(),
            })
        }
    };
    let mut options = TortureOptions::new(Budget::Ops(num("ops")?), num("seed")?, secondaries);
    options.threads = threads as usize;
    options.broken = broken;
    options.hot = num("hot")?;
    options.keep_going = keep_going;
    options.schedule = Some(schedule);
    Ok(ReplayFile {
        options,
        violations: num("violations")?,
        first,
    })
}
