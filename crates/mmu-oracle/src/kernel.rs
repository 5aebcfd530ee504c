//! The kernel side: a script run by a worker process on the running kernel, its
//! MMU-notifier calls read from KVM's tracepoints.
//!
//! # How the calls are observed
//! The worker (this crate's binary, `mmu-oracle worker`, a fresh process per script, so
//! its address space starts empty) disables transparent huge pages for itself, pins
//! itself to one CPU, creates two memfds and a KVM virtual machine (no memory slots, no
//! vCPUs: only the subscription to its address space matters), then reads operations
//! from its standard input and answers each with its result. A `fork` makes a child
//! that creates a virtual machine of its own; the worker relays the child's operations.
//!
//! The runner ([`Kernel`]) has a tracing instance of its own (`instances/NAME` under
//! tracefs, mounted by the runner if it is not) with only the three KVM events enabled
//! and only the worker's processes followed (`set_event_pid` and the `event-fork`
//! option, so the child is followed too). The tracepoints fire inside the notifier calls,
//! in the calling process, before its system call returns: after each answer the runner
//! reads the instance's buffer, attributes each event to the parent or the child by its
//! pid, and empties the buffer.
//!
//! # Swap
//! `MADV_PAGEOUT` of anonymous memory reclaims only with swap. Without any, the runner
//! makes a small swap file and turns it on for the time of the run.
//!
//! # Nothing left behind
//! The tracing instance, a tracefs mount and a swap file the runner made are removed by
//! guards when it is dropped, including on a panic; their names carry the runner's pid,
//! and a new runner first removes those whose process is gone (a runner that was
//! killed). The worker dies with its standard input.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use crate::script::{self, Advice, Kind, Op, Prot, Who, MEMFDS, MEMFD_PAGES};
use crate::{Note, Step, BASE, PAGE};

/// Prefix of every name the runner gives what it creates (tracing instances, mounts,
/// swap files), followed by its pid.
pub const PREFIX: &str = "mmu-oracle-";
const KVM_EVENTS: [&str; 3] = ["kvm_unmap_hva_range", "kvm_age_hva", "kvm_test_age_hva"];
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// Where a swap file may go, in order of preference (swap needs a disk file system;
/// `/tmp` may be a tmpfs).
fn swap_dirs() -> [PathBuf; 2] {
    [PathBuf::from("/var/tmp"), std::env::temp_dir()]
}
const SWAP_PAGES: usize = 4096;

/// Why the kernel side cannot run here (missing root, `/dev/kvm`, tracefs, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn errno_name(e: i32) -> String {
    match e {
        libc::EINVAL => "EINVAL".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::EAGAIN => "EAGAIN".into(),
        e => format!("errno{e}"),
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name `PREFIX<pid>[-...]`, if it is one of ours.
fn owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    rest.split(['-', '.']).next()?.parse().ok()
}

// ----- tracing ---------------------------------------------------------------------------

/// The runner's tracing instance (and tracefs mount, if it made one).
struct Tracing {
    instance: PathBuf,
    mounted: Option<Arc<Mount>>,
    /// The instance's `trace_pipe`, open (non-blocking) while a script runs: a consuming
    /// read, so nothing has to be reset between operations (resetting the buffer waits
    /// for an RCU grace period, which would dominate the run time).
    pipe: Mutex<Option<std::fs::File>>,
}

fn write_file(path: &Path, s: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?
        .write_all(s.as_bytes())
}

impl Tracing {
    fn open() -> Result<Tracing, Unavailable> {
        let sys = Path::new("/sys/kernel/tracing");
        let (root, mounted) = if sys.join("instances").is_dir() {
            (sys.to_path_buf(), None)
        } else {
            let m = Mount::open()?;
            (m.0.clone(), Some(m))
        };
        // From here on, the guard removes what exists.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        );
        let mut t = Tracing {
            instance: root.join("instances").join(name),
            mounted,
            pipe: Mutex::new(None),
        };
        remove_stale_instances(&root.join("instances"));
        if !root.join("events/kvm").is_dir() {
            t.instance = PathBuf::new();
            return Err(Unavailable(
                "no kvm trace events (kvm module not loaded?)".into(),
            ));
        }
        std::fs::create_dir(&t.instance).map_err(|e| {
            let err = Unavailable(format!("cannot create a tracing instance: {e}"));
            t.instance = PathBuf::new();
            err
        })?;
        for ev in KVM_EVENTS {
            write_file(&t.instance.join("events/kvm").join(ev).join("enable"), "1")
                .map_err(|e| Unavailable(format!("cannot enable kvm/{ev}: {e}")))?;
        }
        write_file(&t.instance.join("options/event-fork"), "1")
            .map_err(|e| Unavailable(format!("cannot set event-fork: {e}")))?;
        Ok(t)
    }

    /// Follows only `pid` (and the processes it forks from now on), from an empty
    /// buffer, and opens the pipe.
    fn follow(&self, pid: u32) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        write_file(&self.instance.join("set_event_pid"), &pid.to_string())?;
        write_file(&self.instance.join("trace"), "")?;
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(self.instance.join("trace_pipe"))?;
        *self.pipe.lock().unwrap_or_else(|e| e.into_inner()) = Some(pipe);
        Ok(())
    }

    /// Closes the pipe (the instance cannot be removed while it is open).
    fn unfollow(&self) {
        *self.pipe.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The events emitted since the last call, as (pid, note without owner).
    fn take(&self) -> Result<Vec<(i32, Note)>, String> {
        let mut pipe = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        let pipe = pipe.as_mut().ok_or("not following")?;
        let mut bytes = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading the trace: {e}")),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let mut out = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.contains("LOST") {
                return Err(format!("trace lost events: {line}"));
            }
            out.push(parse_event(line).ok_or_else(|| format!("unreadable event {line:?}"))?);
        }
        Ok(out)
    }
}

/// Parses `comm-PID [CPU] flags TIME: EVENT: text: 0xSTART -- 0xEND`.
fn parse_event(line: &str) -> Option<(i32, Note)> {
    let bracket = line.find(" [")?;
    let task = line[..bracket].trim();
    let pid: i32 = task.rsplit('-').next()?.parse().ok()?;
    let (ev, rest) = KVM_EVENTS.iter().find_map(|ev| {
        let key = format!(" {ev}: ");
        line.find(&key).map(|i| (*ev, &line[i + key.len()..]))
    })?;
    let nums: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("0x"))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect();
    // The owner is filled in by the caller.
    let w = Who::Parent;
    Some((
        pid,
        match (ev, nums.as_slice()) {
            ("kvm_unmap_hva_range", [s, e]) => Note::Invalidate(w, *s, *e),
            ("kvm_age_hva", [s, e]) => Note::Age(w, *s, *e),
            ("kvm_test_age_hva", [a]) => Note::TestAge(w, *a),
            _ => return None,
        },
    ))
}

fn remove_stale_instances(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if owner(&name).is_some_and(|pid| !pid_alive(pid)) {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn remove_stale_mounts() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(dir), Some("tracefs")) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = Path::new(dir);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name
            .as_deref()
            .and_then(owner)
            .is_some_and(|pid| !pid_alive(pid))
        {
            unmount(path);
        }
    }
}

fn unmount(dir: &Path) {
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; MNT_DETACH cannot fail on a busy mount.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Tracing {
    fn drop(&mut self) {
        self.unfollow();
        if !self.instance.as_os_str().is_empty() && self.instance.exists() {
            let _ = write_file(&self.instance.join("tracing_on"), "0");
            // rmdir fails with EBUSY while a file of the instance is open; none is
            // kept open, but retry briefly for a reader that is just closing.
            for _ in 0..50 {
                if std::fs::remove_dir(&self.instance).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // The mount goes with the last runner of the process (`Mount`'s drop).
        self.mounted = None;
    }
}

/// A tracefs mount of this process's (when the system has none), shared by its runners
/// and unmounted with the last.
struct Mount(PathBuf);

impl Mount {
    fn open() -> Result<Arc<Mount>, Unavailable> {
        static SHARED: Mutex<Weak<Mount>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = shared.upgrade() {
            return Ok(m);
        }
        let dir = std::env::temp_dir().join(format!("{PREFIX}{}-tracefs", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let c = CString::new(dir.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: all pointers are valid NUL-terminated strings for the call's duration;
        // tracefs takes no mount data.
        let r = unsafe {
            libc::mount(
                c"nodev".as_ptr(),
                c.as_ptr(),
                c"tracefs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(Unavailable(format!("cannot mount tracefs: {e}")));
        }
        let m = Arc::new(Mount(dir));
        *shared = Arc::downgrade(&m);
        Ok(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

// ----- swap ------------------------------------------------------------------------------

/// Swap for the run: none needed (the system has some), or a swap file of ours, on
/// while any runner of this process is alive.
struct Swap {
    file: Option<PathBuf>,
}

fn active_swaps() -> Vec<String> {
    std::fs::read_to_string("/proc/swaps")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn swapoff(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::swapoff(c.as_ptr()) };
}

fn remove_stale_swaps() {
    let active = active_swaps();
    for dir in swap_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|pid| !pid_alive(pid)) && name.ends_with(".swap") {
                let path = e.path();
                if active.iter().any(|a| Path::new(a) == path) {
                    swapoff(&path);
                }
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

impl Swap {
    fn open() -> Result<Arc<Swap>, Unavailable> {
        static SHARED: Mutex<Weak<Swap>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = shared.upgrade() {
            return Ok(s);
        }
        remove_stale_swaps();
        let swap = if active_swaps().is_empty() {
            let mut why = Vec::new();
            let mut made = None;
            for dir in swap_dirs() {
                let path = dir.join(format!("{PREFIX}{}.swap", std::process::id()));
                if let Err(e) = make_swap_file(&path) {
                    let _ = std::fs::remove_file(&path);
                    why.push(format!("{}: {e}", path.display()));
                    continue;
                }
                let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::swapon(c.as_ptr(), 0) } != 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = std::fs::remove_file(&path);
                    why.push(format!("swapon {}: {e}", path.display()));
                    continue;
                }
                made = Some(path);
                break;
            }
            let Some(path) = made else {
                return Err(Unavailable(format!(
                    "no swap, and none could be made: {}",
                    why.join("; ")
                )));
            };
            Swap { file: Some(path) }
        } else {
            Swap { file: None }
        };
        let swap = Arc::new(swap);
        *shared = Arc::downgrade(&swap);
        Ok(swap)
    }
}

/// A swap file: a header page (version 1, the last page, the signature) and zeroes.
fn make_swap_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut header = vec![0u8; PAGE as usize];
    header[1024..1028].copy_from_slice(&1u32.to_ne_bytes());
    header[1028..1032].copy_from_slice(&(SWAP_PAGES as u32 - 1).to_ne_bytes());
    header[PAGE as usize - 10..].copy_from_slice(b"SWAPSPACE2");
    f.write_all(&header)?;
    let zeroes = vec![0u8; PAGE as usize * 64];
    for _ in 0..(SWAP_PAGES - 1) / 64 {
        f.write_all(&zeroes)?;
    }
    f.write_all(&zeroes[..PAGE as usize * ((SWAP_PAGES - 1) % 64)])?;
    f.sync_all()
}

impl Drop for Swap {
    fn drop(&mut self) {
        if let Some(path) = &self.file {
            swapoff(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

// ----- the runner ------------------------------------------------------------------------

/// Runs scripts on the running kernel.
pub struct Kernel {
    worker: PathBuf,
    tracing: Tracing,
    _swap: Arc<Swap>,
}

/// One script at a time per process: the swap and the CPU are shared.
static RUNS: Mutex<()> = Mutex::new(());

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("instance", &self.tracing.instance)
            .finish()
    }
}

impl Kernel {
    /// Prepares the kernel side: checks root and `/dev/kvm`, removes what a killed
    /// runner left behind, creates the tracing instance and, if the system has no swap,
    /// a swap file. `worker` is this crate's binary (it runs `worker` mode).
    pub fn open(worker: &Path) -> Result<Kernel, Unavailable> {
        // SAFETY: no arguments, no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Unavailable("not root".into()));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| Unavailable(format!("/dev/kvm: {e}")))?;
        if !worker.exists() {
            return Err(Unavailable(format!(
                "no worker binary {}",
                worker.display()
            )));
        }
        remove_stale_mounts();
        let tracing = Tracing::open()?;
        let swap = Swap::open()?;
        Ok(Kernel {
            worker: worker.to_path_buf(),
            tracing,
            _swap: swap,
        })
    }

    /// The tracing instance's directory (to check that it goes away).
    pub fn instance(&self) -> &Path {
        &self.tracing.instance
    }

    /// The swap file this process turned on, if it had to make one.
    pub fn swap_file(&self) -> Option<&Path> {
        self._swap.file.as_deref()
    }

    /// Runs `ops` in a fresh worker process and returns what each did.
    pub fn run(&self, ops: &[Op]) -> Result<Vec<Step>, String> {
        let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = Worker::start(&self.worker)?;
        let result = self.run_with(&mut w, ops);
        w.finish();
        self.tracing.unfollow();
        result
    }

    fn run_with(&self, w: &mut Worker, ops: &[Op]) -> Result<Vec<Step>, String> {
        let parent = w.child.id() as i32;
        self.tracing
            .follow(parent as u32)
            .map_err(|e| format!("following the worker: {e}"))?;
        let mut child_pid: Option<i32> = None;
        let mut steps = Vec::with_capacity(ops.len());
        for op in ops {
            let answer = w.ask(&op.to_string())?;
            let mut words = answer.split_whitespace();
            let result = words.next().unwrap_or("").to_string();
            if let Some(pid) = words.next().and_then(|p| p.parse().ok()) {
                child_pid = Some(pid);
            }
            let mut notes = Vec::new();
            for (pid, note) in self.tracing.take()? {
                let who = if pid == parent {
                    Who::Parent
                } else if Some(pid) == child_pid {
                    Who::Child
                } else {
                    continue;
                };
                let note = match note {
                    Note::Invalidate(_, s, e) => Note::Invalidate(who, s, e),
                    Note::Age(_, s, e) => Note::Age(who, s, e),
                    Note::TestAge(_, a) => Note::TestAge(who, a),
                };
                if note.relevant() {
                    notes.push(note);
                }
            }
            steps.push(Step { result, notes });
        }
        Ok(steps)
    }
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn start(exe: &Path) -> Result<Worker, String> {
        let mut child = Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut w = Worker {
            child,
            stdin,
            stdout,
        };
        let hello = w.read_line()?;
        if hello != "ready" {
            w.finish();
            return Err(format!("worker: {hello}"));
        }
        Ok(w)
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("the worker died".into()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("reading from the worker: {e}")),
        }
    }

    fn ask(&mut self, line: &str) -> Result<String, String> {
        let stdin = self.stdin.as_mut().ok_or("worker closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to the worker: {e}"))?;
        self.read_line()
    }

    fn finish(&mut self) {
        // End of input: the worker ends its child and exits.
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let _ = self.stdout.read_to_end(&mut rest);
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ----- the worker ------------------------------------------------------------------------

fn addr(page: u64) -> u64 {
    BASE + page * PAGE
}

fn prot_bits(p: Prot) -> i32 {
    match p {
        Prot::Rw => libc::PROT_READ | libc::PROT_WRITE,
        Prot::Ro => libc::PROT_READ,
        Prot::None => libc::PROT_NONE,
    }
}

fn check(r: i64) -> String {
    if r == -1 {
        errno_name(last_errno())
    } else {
        "ok".into()
    }
}

/// What both the worker and its child can do: an 8-byte write through
/// `process_vm_writev` to itself (a fault becomes EFAULT instead of a signal; the
/// write faults the page in, breaking COW, as a CPU write does) and the soft-dirty reset.
fn write_page(page: u64) -> String {
    let value = page + 1;
    let local = libc::iovec {
        iov_base: &value as *const u64 as *mut libc::c_void,
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr(page) as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` points at a live u64 for the call; the remote side is checked by
    // the kernel (faults are returned as EFAULT, never taken by this process).
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n == 8 {
        "ok".into()
    } else if n < 0 {
        errno_name(last_errno())
    } else {
        "EFAULT".into()
    }
}

fn clear_refs() -> String {
    match write_file(Path::new("/proc/self/clear_refs"), "4") {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

fn create_vm(kvm: i32) -> Result<i32, String> {
    // SAFETY: KVM_CREATE_VM takes an integer (the machine type, 0) and returns an fd.
    let vm = unsafe { libc::ioctl(kvm, KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(format!(
            "KVM_CREATE_VM: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(vm)
}

fn setup() -> Result<(i32, Vec<i32>), String> {
    // SAFETY: plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_THP_DISABLE: {}",
            std::io::Error::last_os_error()
        ));
    }
    // One CPU: per-CPU page batches are then drained by the operations themselves.
    // SAFETY: `set` is a valid cpu_set_t for the calls.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let mut memfds = Vec::new();
    for _ in 0..MEMFDS {
        // SAFETY: a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"mmu-oracle".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: plain integer arguments.
        if fd < 0 || unsafe { libc::ftruncate(fd, (MEMFD_PAGES * PAGE) as i64) } != 0 {
            return Err(format!("memfd: {}", std::io::Error::last_os_error()));
        }
        memfds.push(fd);
    }
    // SAFETY: a valid NUL-terminated path.
    let kvm = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if kvm < 0 {
        return Err(format!("/dev/kvm: {}", std::io::Error::last_os_error()));
    }
    create_vm(kvm)?;
    Ok((kvm, memfds))
}

struct ChildProc {
    pid: i32,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
}

impl ChildProc {
    fn ask(&mut self, line: &str) -> String {
        if writeln!(self.to, "{line}").is_err() {
            return "child-died".into();
        }
        let mut s = String::new();
        match self.from.read_line(&mut s) {
            Ok(n) if n > 0 => s.trim_end().to_string(),
            _ => "child-died".into(),
        }
    }

    fn exit(self) {
        drop(self.to);
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// The forked child: makes its own virtual machine, then does what the worker relays
/// (writes and soft-dirty resets) until its input ends.
fn child_main(kvm: i32, from: std::fs::File, mut to: std::fs::File) -> ! {
    let hello = match create_vm(kvm) {
        Ok(_) => "ready".to_string(),
        Err(e) => e,
    };
    let _ = writeln!(to, "{hello}");
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { break };
        let answer = match script::parse(&format!("fork\nchild {line}")).as_deref() {
            Ok([_, Op::Write { at, .. }]) => write_page(*at),
            Ok([_, Op::ClearRefs { .. }]) => clear_refs(),
            _ => format!("bad-child-op({line})"),
        };
        if writeln!(to, "{answer}").is_err() {
            break;
        }
    }
    // SAFETY: ends this process without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

/// The worker process (`mmu-oracle worker`): see the module docs. Prints `ready`, then
/// one answer per operation line read from standard input: `ok` or an errno name (and
/// after a `fork`, the child's pid).
pub fn worker_main() -> ! {
    let (kvm, memfds) = match setup() {
        Ok(x) => x,
        Err(e) => {
            println!("{e}");
            std::process::exit(1);
        }
    };
    println!("ready");
    let mut child: Option<ChildProc> = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let op = match script::parse(&format!(
            "{}{line}",
            if child.is_some() && line.starts_with("child") {
                "fork\n"
            } else {
                ""
            }
        )) {
            Ok(mut ops) => ops.pop(),
            Err(e) => {
                println!("bad-op({e})");
                continue;
            }
        };
        let answer = match op {
            None => "bad-op(empty)".to_string(),
            Some(op) => run_op(&op, &memfds, kvm, &mut child),
        };
        println!("{answer}");
    }
    if let Some(c) = child.take() {
        c.exit();
    }
    std::process::exit(0);
}

fn run_op(op: &Op, memfds: &[i32], kvm: i32, child: &mut Option<ChildProc>) -> String {
    // SAFETY (every call below): the system calls only take integers and addresses in
    // the script's region, which nothing else in this process uses; a mapping call's
    // effect on the region is what the script asks for.
    unsafe {
        match *op {
            Op::Mmap {
                at,
                len,
                kind,
                prot,
            } => {
                let (flags, fd, off) = match kind {
                    Kind::Anon => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
                    Kind::Shm => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0),
                    Kind::Memfd { id, off, shared } => (
                        if shared {
                            libc::MAP_SHARED
                        } else {
                            libc::MAP_PRIVATE
                        },
                        memfds[id as usize],
                        off * PAGE,
                    ),
                };
                let p = libc::mmap(
                    addr(at) as *mut libc::c_void,
                    (len * PAGE) as usize,
                    prot_bits(prot),
                    flags | libc::MAP_FIXED,
                    fd,
                    off as i64,
                );
                check(if p == libc::MAP_FAILED { -1 } else { 0 })
            }
            Op::Munmap { at, len } => {
                check(libc::munmap(addr(at) as *mut libc::c_void, (len * PAGE) as usize).into())
            }
            Op::Mprotect { at, len, prot } => check(
                libc::mprotect(
                    addr(at) as *mut libc::c_void,
                    (len * PAGE) as usize,
                    prot_bits(prot),
                )
                .into(),
            ),
            Op::Madvise { at, len, advice } => {
                let a = match advice {
                    Advice::DontNeed => libc::MADV_DONTNEED,
                    Advice::Free => libc::MADV_FREE,
                    Advice::PageOut => libc::MADV_PAGEOUT,
                };
                check(libc::madvise(addr(at) as *mut libc::c_void, (len * PAGE) as usize, a).into())
            }
            Op::Mremap {
                at,
                old,
                new,
                may_move,
                fixed,
            } => {
                let mut flags = 0;
                if may_move || fixed.is_some() {
                    flags |= libc::MREMAP_MAYMOVE;
                }
                if fixed.is_some() {
                    flags |= libc::MREMAP_FIXED;
                }
                let r = libc::syscall(
                    libc::SYS_mremap,
                    addr(at),
                    old * PAGE,
                    new * PAGE,
                    flags,
                    fixed.map_or(0, addr),
                );
                check(if r < 0 && r > -4096 { -1 } else { 0 })
            }
            Op::Fork => {
                if child.is_some() {
                    return "bad-op(second child)".into();
                }
                let (to_child_r, to_child_w) = pipe();
                let (from_child_r, from_child_w) = pipe();
                let pid = libc::fork();
                if pid == 0 {
                    drop(to_child_w);
                    drop(from_child_r);
                    child_main(kvm, to_child_r, from_child_w);
                }
                if pid < 0 {
                    return errno_name(last_errno());
                }
                drop(to_child_r);
                drop(from_child_w);
                let mut c = ChildProc {
                    pid,
                    to: to_child_w,
                    from: BufReader::new(from_child_r),
                };
                let mut hello = String::new();
                let _ = c.from.read_line(&mut hello);
                if hello.trim_end() != "ready" {
                    return format!("child-failed({})", hello.trim_end());
                }
                *child = Some(c);
                format!("ok {pid}")
            }
            Op::Write {
                who: Who::Parent,
                at,
            } => write_page(at),
            Op::ClearRefs { who: Who::Parent } => clear_refs(),
            Op::Write {
                who: Who::Child,
                at,
            } => match child {
                Some(c) => c.ask(&format!("write {at}")),
                None => "bad-op(no child)".into(),
            },
            Op::ClearRefs { who: Who::Child } => match child {
                Some(c) => c.ask("clear-refs"),
                None => "bad-op(no child)".into(),
            },
            Op::ChildExit => match child.take() {
                Some(c) => {
                    c.exit();
                    "ok".into()
                }
                None => "bad-op(no child)".into(),
            },
        }
    }
}
