//! The parser of strace's text output.
//!
//! # What a line looks like
//! `strace -f` prefixes each line with the task's id (`1234 mmap(...)` with `-o FILE`,
//! `[pid 1234] mmap(...)` on a terminal), optionally followed by a timestamp (`-t`, `-tt`,
//! `-ttt`). A call is printed as `name(args) = result`, where the result is a number, `?`
//! (the call does not return: `exit`, `exit_group`, a successful `execve` seen from
//! another task) or `-1 ERRNO (text)`; `-T` appends `<seconds>`. When another task prints
//! while a call is in flight, the call is split: `name(first args <unfinished ...>` now,
//! `<... name resumed>rest of args) = result` when it returns; the two halves are joined
//! here, per task, into one [`Call`] completed at the resumption. Lines starting with
//! `+++` report a task's end (`+++ exited with 0 +++`, `+++ killed by SIGKILL +++`),
//! `---` a signal. Anything else (strace's own messages) is counted, never fatal.

use std::collections::HashMap;

/// What a call returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ret {
    /// A value (an address, a length, a task id, 0).
    Value(u64),
    /// `-1 ERRNO`: the call failed; the errno's name.
    Error(String),
    /// `?`: the call did not return to the task.
    Unknown,
}

/// One system call, arguments and result joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The task that made it (0 if the trace has no task ids).
    pub pid: u32,
    /// The call's name (`mmap`, `clone3`, ...).
    pub name: String,
    /// The top-level arguments as printed.
    pub args: Vec<String>,
    /// The result.
    pub ret: Ret,
}

/// One meaningful line of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A complete call (or the second half of a split one, joined with its first).
    Call(Call),
    /// The first half of a split call: the task is now inside `name`, with the arguments
    /// printed so far (the last one possibly cut).
    Unfinished {
        /// The task.
        pid: u32,
        /// The call.
        name: String,
        /// The arguments printed before the split.
        args: Vec<String>,
    },
    /// The task ended (`+++ exited ...`, `+++ killed ...`).
    TaskEnd {
        /// The task.
        pid: u32,
    },
    /// A signal was delivered, or strace printed something about the task: no effect on
    /// memory.
    Note,
}

/// Why a line was not understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not a call, a task's end or a signal.
    Unrecognized,
    /// A `resumed` half without its `unfinished` half.
    Orphan(String),
}

/// Joins split calls across lines; one per trace.
#[derive(Debug, Default)]
pub struct Parser {
    /// Per task: the call in flight and the text of its first half.
    pending: HashMap<u32, (String, String)>,
}

impl Parser {
    /// Parses one line (without its newline).
    pub fn line(&mut self, line: &str) -> Result<Record, LineError> {
        let line = line.trim_end();
        let (pid, rest) = split_pid(line);
        let rest = skip_timestamp(rest);
        if rest.starts_with("+++") {
            return Ok(if rest.contains("exited") || rest.contains("killed") {
                Record::TaskEnd { pid }
            } else {
                Record::Note
            });
        }
        if rest.starts_with("---") || rest.starts_with("strace:") || rest.is_empty() {
            return Ok(Record::Note);
        }
        if let Some(after) = rest.strip_prefix("<... ") {
            let (name, tail) = after
                .split_once(" resumed>")
                .ok_or(LineError::Unrecognized)?;
            let Some((pending_name, head)) = self.pending.remove(&pid) else {
                return Err(LineError::Orphan(name.to_string()));
            };
            if pending_name != name {
                return Err(LineError::Orphan(name.to_string()));
            }
            let joined = format!("{head}{tail}");
            return self.complete(pid, &joined);
        }
        if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            let (name, args) = name_and_args(head).ok_or(LineError::Unrecognized)?;
            let head = head.trim_end();
            let args = split_args(args);
            self.pending
                .insert(pid, (name.to_string(), format!("{head} ")));
            return Ok(Record::Unfinished {
                pid,
                name: name.to_string(),
                args,
            });
        }
        self.complete(pid, rest)
    }

    fn complete(&mut self, pid: u32, text: &str) -> Result<Record, LineError> {
        let (name, body) = name_and_args(text).ok_or(LineError::Unrecognized)?;
        let close = closing_paren(body).ok_or(LineError::Unrecognized)?;
        let args = split_args(&body[..close]);
        let after = body[close + 1..].trim_start();
        let result = after.strip_prefix('=').ok_or(LineError::Unrecognized)?;
        let ret = parse_ret(result.trim_start()).ok_or(LineError::Unrecognized)?;
        Ok(Record::Call(Call {
            pid,
            name: name.to_string(),
            args,
            ret,
        }))
    }

    /// Calls split by strace whose second half never came (the task was killed, or the
    /// trace was cut).
    pub fn unfinished(&self) -> usize {
        self.pending.len()
    }
}

/// `1234 rest`, `[pid 1234] rest` or `rest` (task id 0).
fn split_pid(line: &str) -> (u32, &str) {
    if let Some(r) = line.strip_prefix("[pid") {
        if let Some((n, rest)) = r.split_once(']') {
            if let Ok(pid) = n.trim().parse() {
                return (pid, rest.trim_start());
            }
        }
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && line[digits..].starts_with(' ') {
        if let Ok(pid) = line[..digits].parse() {
            return (pid, line[digits..].trim_start());
        }
    }
    (0, line)
}

/// Skips a `-t`/`-tt`/`-ttt` timestamp (`12:34:56`, `12:34:56.123456`, `1700000000.1234`)
/// and a `-i` instruction pointer (`[00007f0123456789]`).
fn skip_timestamp(s: &str) -> &str {
    let n = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b':' || *b == b'.')
        .count();
    let s = if n > 0 && s[n..].starts_with(' ') && s[..n].contains([':', '.']) {
        s[n..].trim_start()
    } else {
        s
    };
    if let Some(r) = s.strip_prefix('[') {
        let n = r.bytes().take_while(u8::is_ascii_hexdigit).count();
        if n > 0 && r[n..].starts_with("] ") {
            return r[n + 2..].trim_start();
        }
    }
    s
}

/// `name(args...` -> (`name`, `args...`).
fn name_and_args(s: &str) -> Option<(&str, &str)> {
    let open = s.find('(')?;
    let name = &s[..open];
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'?')
    {
        return None;
    }
    Some((name, &s[open + 1..]))
}

/// Tracks nesting and strings while scanning arguments.
struct Scan {
    depth: i32,
    in_str: bool,
    escaped: bool,
}

impl Scan {
    fn new() -> Self {
        Scan {
            depth: 0,
            in_str: false,
            escaped: false,
        }
    }

    /// Feeds one byte; true if it is structural at the top level.
    fn top(&mut self, b: u8) -> bool {
        if self.in_str {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_str = false,
                _ => {}
            }
            return false;
        }
        match b {
            b'"' => self.in_str = true,
            b'(' | b'[' | b'{' => self.depth += 1,
            b')' | b']' | b'}' => {
                self.depth -= 1;
                return self.depth < 0;
            }
            _ => return self.depth == 0,
        }
        false
    }
}

/// Index of the `)` closing the argument list.
fn closing_paren(body: &str) -> Option<usize> {
    let mut scan = Scan::new();
    for (i, b) in body.bytes().enumerate() {
        if scan.top(b) && b == b')' {
            return Some(i);
        }
    }
    None
}

/// Splits at top-level commas; trims each argument.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut scan = Scan::new();
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        if scan.top(b) && b == b',' {
            out.push(s[start..i].trim().to_string());
            start = i + 1;
        }
    }
    let last = s[start..].trim();
    if !last.is_empty() {
        out.push(last.to_string());
    }
    out
}

fn parse_ret(s: &str) -> Option<Ret> {
    let first = s.split_whitespace().next()?;
    if first == "?" {
        // `? ERESTARTSYS (...)`: interrupted, to be restarted: it did not happen.
        return Some(match s.split_whitespace().nth(1) {
            Some(e) if e.starts_with('E') => Ret::Error(e.to_string()),
            _ => Ret::Unknown,
        });
    }
    if first.starts_with('-') {
        let errno = s.split_whitespace().nth(1).filter(|e| e.starts_with('E'));
        return Some(Ret::Error(errno.unwrap_or(first).to_string()));
    }
    number(first).map(Ret::Value)
}

/// A number as strace prints it: decimal, `0x` hex, octal `0...`, or `NULL`.
pub fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "NULL" {
        return Some(0);
    }
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).ok();
    }
    if s.len() > 1 && s.starts_with('0') && s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return u64::from_str_radix(&s[1..], 8).ok();
    }
    s.parse().ok()
}

/// The names of a `A|B|C` flag set (numbers left in, as strace prints unknown bits).
pub fn flags(s: &str) -> Vec<&str> {
    s.split('|')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect()
}

/// A file descriptor argument: `3`, `3</path/to/file>` (with `-y`), `-1`.
/// Returns the number and the path if printed.
pub fn fd(s: &str) -> Option<(i64, Option<&str>)> {
    let s = s.trim();
    match s.find('<') {
        Some(i) => {
            let n = s[..i].parse().ok()?;
            let path = s[i + 1..].strip_suffix('>')?;
            Some((n, Some(path)))
        }
        None => Some((s.parse().ok()?, None)),
    }
}

/// Whether the flag set `s` has `name`, by name or by its `bit` in a number (strace
/// prints bits it has no name for as hex, and everything as numbers with `-X raw`).
pub fn has_flag(s: &str, name: &str, bit: u64) -> bool {
    flags(s)
        .into_iter()
        .any(|f| f == name || number(f).is_some_and(|n| n & bit != 0))
}

/// The `flags=...` of `clone` (`flags=CLONE_VM|...`) or `clone3` (`{flags=..., ...}`).
pub fn clone_flags(args: &[String]) -> Option<&str> {
    args.iter().find_map(|a| {
        let i = a.find("flags=")?;
        let v = &a[i + "flags=".len()..];
        let end = v.find([',', '}', ' ']).unwrap_or(v.len());
        Some(&v[..end])
    })
}

/// Whether a `clone`/`clone3` shares the address space (`CLONE_VM`).
pub fn clone_vm(args: &[String]) -> bool {
    clone_flags(args).is_some_and(|f| has_flag(f, "CLONE_VM", 0x100))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(r: Record) -> Call {
        match r {
            Record::Call(c) => c,
            other => panic!("not a call: {other:?}"),
        }
    }

    #[test]
    fn plain_call_with_pid_and_path() {
        let mut p = Parser::default();
        let c = call(
            p.line(
                "11540 mmap(NULL, 1974096, PROT_READ, MAP_PRIVATE|MAP_DENYWRITE, \
                 3</usr/lib/x86_64-linux-gnu/libc.so.6>, 0) = 0x7fb9a05eb000",
            )
            .unwrap(),
        );
        assert_eq!(c.pid, 11540);
        assert_eq!(c.name, "mmap");
        assert_eq!(c.args.len(), 6);
        assert_eq!(number(&c.args[1]), Some(1974096));
        assert_eq!(flags(&c.args[3]), ["MAP_PRIVATE", "MAP_DENYWRITE"]);
        assert_eq!(
            fd(&c.args[4]),
            Some((3, Some("/usr/lib/x86_64-linux-gnu/libc.so.6")))
        );
        assert_eq!(c.ret, Ret::Value(0x7fb9a05eb000));
    }

    #[test]
    fn no_pid_bracket_pid_timestamps_and_durations() {
        let mut p = Parser::default();
        let c = call(
            p.line("brk(NULL)                         = 0x55d2a49f2000")
                .unwrap(),
        );
        assert_eq!((c.pid, c.ret), (0, Ret::Value(0x55d2a49f2000)));
        let c = call(
            p.line("[pid  4242] 12:00:01.123456 munmap(0x7f0000000000, 4096) = 0 <0.000011>")
                .unwrap(),
        );
        assert_eq!(
            (c.pid, c.name.as_str(), c.ret),
            (4242, "munmap", Ret::Value(0))
        );
        let c = call(p.line("77 1700000000.250000 brk(0x1000) = 0x1000").unwrap());
        assert_eq!((c.pid, c.name.as_str()), (77, "brk"));
        let c = call(p.line("78 [00007f0123456789] brk(NULL) = 0x1000").unwrap());
        assert_eq!((c.pid, c.name.as_str()), (78, "brk"));
    }

    #[test]
    fn errors_and_no_return() {
        let mut p = Parser::default();
        let c = call(
            p.line("9 mmap(NULL, 1099511627776, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = -1 ENOMEM (Cannot allocate memory)")
                .unwrap(),
        );
        assert_eq!(c.ret, Ret::Error("ENOMEM".into()));
        let c = call(p.line("9 exit_group(0)                     = ?").unwrap());
        assert_eq!(c.ret, Ret::Unknown);
        let c = call(
            p.line("9 wait4(-1,  <unfinished ...>")
                .map(|_| p.line("9 <... wait4 resumed>0x7ffd, 0, NULL) = ? ERESTARTSYS (To be restarted if SA_RESTART is set)"))
                .unwrap()
                .unwrap(),
        );
        assert_eq!(c.ret, Ret::Error("ERESTARTSYS".into()));
    }

    #[test]
    fn unfinished_and_resumed_are_joined_per_task() {
        let mut p = Parser::default();
        let u = p.line("11662 vfork( <unfinished ...>").unwrap();
        assert_eq!(
            u,
            Record::Unfinished {
                pid: 11662,
                name: "vfork".into(),
                args: vec![]
            }
        );
        // Another task's complete call in between.
        let e = call(
            p.line(
                r#"11663 execve("/bin/true", ["true", "a, b) = 1"], 0x3831c290 /* 40 vars */) = 0"#,
            )
            .unwrap(),
        );
        assert_eq!(
            e.args.len(),
            3,
            "commas and parens inside strings are not structure"
        );
        let c = call(
            p.line("11662 <... vfork resumed>)              = 11663")
                .unwrap(),
        );
        assert_eq!((c.name.as_str(), c.ret), ("vfork", Ret::Value(11663)));
        assert_eq!(p.unfinished(), 0);

        p.line("5 mremap(0x7f0000000000, 8192, 16384, MREMAP_MAYMOVE <unfinished ...>")
            .unwrap();
        let c = call(p.line("5 <... mremap resumed>) = 0x7f1000000000").unwrap());
        assert_eq!(
            c.args,
            ["0x7f0000000000", "8192", "16384", "MREMAP_MAYMOVE"],
            "an argument split by the interruption is joined"
        );
        p.line("6 mmap(NULL, 8192, <unfinished ...>").unwrap();
        let c = call(
            p.line("6 <... mmap resumed>PROT_READ, MAP_SHARED, 3, 0) = 0x7f0000000000")
                .unwrap(),
        );
        assert_eq!(c.args.len(), 6);
        assert_eq!(c.args[2], "PROT_READ");
    }

    #[test]
    fn orphans_and_garbage_are_errors_not_panics() {
        let mut p = Parser::default();
        assert_eq!(
            p.line("3 <... mmap resumed>) = 0"),
            Err(LineError::Orphan("mmap".into()))
        );
        p.line("3 munmap(0x1000, 4096 <unfinished ...>").unwrap();
        assert!(
            p.line("3 <... mmap resumed>) = 0").is_err(),
            "a different call"
        );
        assert_eq!(p.line("garbage"), Err(LineError::Unrecognized));
        assert_eq!(p.line("4 mmap(NULL, 4096"), Err(LineError::Unrecognized));
        assert_eq!(p.line("4 mmap(NULL) junk"), Err(LineError::Unrecognized));
        assert_eq!(p.line(""), Ok(Record::Note));
        assert_eq!(
            p.line("4 +++ exited with 0 +++"),
            Ok(Record::TaskEnd { pid: 4 })
        );
        assert_eq!(
            p.line("[pid 4] +++ killed by SIGKILL +++"),
            Ok(Record::TaskEnd { pid: 4 })
        );
        assert_eq!(
            p.line("4 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED} ---"),
            Ok(Record::Note)
        );
        assert_eq!(p.line("strace: Process 12 attached"), Ok(Record::Note));
    }

    #[test]
    fn clone_flags_of_clone_clone3() {
        let mut p = Parser::default();
        let c = call(p.line("1 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x7fe8bd886a10) = 2").unwrap());
        assert_eq!(
            clone_flags(&c.args).unwrap(),
            "CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD"
        );
        assert!(!clone_vm(&c.args));
        let c = call(p.line("1 clone3({flags=CLONE_VM|CLONE_FS|CLONE_THREAD, child_tid=0x7f38, exit_signal=0, stack=0x7f38166d3000, stack_size=0x7fff80} => {parent_tid=[3]}, 88) = 3").unwrap());
        assert_eq!(c.args.len(), 2);
        assert_eq!(
            clone_flags(&c.args).unwrap(),
            "CLONE_VM|CLONE_FS|CLONE_THREAD"
        );
        assert!(clone_vm(&c.args));
        let u = p.line("1 clone3({flags=CLONE_VM|CLONE_VFORK, exit_signal=SIGCHLD, stack=0x7f, stack_size=0x9000} <unfinished ...>").unwrap();
        let Record::Unfinished { args, .. } = u else {
            panic!("{u:?}")
        };
        assert!(clone_vm(&args));
        // Raw numbers (`-X raw`): CLONE_VM is bit 8.
        let c = call(
            p.line("1 clone(child_stack=NULL, flags=0x4111) = 4")
                .unwrap(),
        );
        assert!(clone_vm(&c.args));
        let c = call(p.line("1 clone(child_stack=NULL, flags=0x11) = 5").unwrap());
        assert!(!clone_vm(&c.args));
    }

    #[test]
    fn numbers() {
        assert_eq!(number("NULL"), Some(0));
        assert_eq!(number("0x10"), Some(16));
        assert_eq!(number("010"), Some(8));
        assert_eq!(number("0"), Some(0));
        assert_eq!(number("4096"), Some(4096));
        assert_eq!(number("PROT_READ"), None);
        assert!(has_flag("MAP_PRIVATE|MAP_ANONYMOUS", "MAP_ANONYMOUS", 0x20));
        assert!(has_flag("0x22", "MAP_ANONYMOUS", 0x20));
        assert!(has_flag("MAP_PRIVATE|0x20", "MAP_ANONYMOUS", 0x20));
        assert!(!has_flag("MAP_PRIVATE|MAP_FIXED", "MAP_ANONYMOUS", 0x20));
        assert_eq!(fd("-1"), Some((-1, None)));
        assert_eq!(
            fd("5<anon_inode:[memfd]>"),
            Some((5, Some("anon_inode:[memfd]")))
        );
    }
}
