//! The simulation side: a script run on [`mmu_sim::AddressSpace`], with a recorder
//! subscribed to each address space.

use std::sync::{Arc, Mutex};

use mmu_notifier::{ListRegistration, ListSubscriber, Range, WouldBlock};
use mmu_sim::{
    AddressSpace, File, FrameAllocator, MapKind, MremapFlags, Prot as SimProt, SimError,
};

use crate::script::{Advice, Kind, Op, Prot, Who, MEMFDS, MEMFD_PAGES};
use crate::{Note, Step, BASE, PAGE};

/// Records every notifier call of one address space.
struct Recorder {
    who: Who,
    log: Arc<Mutex<Vec<Note>>>,
}

impl Recorder {
    fn push(&self, n: Note) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(n);
    }
}

impl ListSubscriber for Recorder {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        self.push(Note::Invalidate(self.who, r.start(), r.end()));
        Ok(())
    }
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        self.push(Note::Age(self.who, start, end));
        false
    }
    fn clear_young(&self, start: u64, end: u64) -> bool {
        self.push(Note::Age(self.who, start, end));
        false
    }
    fn test_young(&self, addr: u64) -> bool {
        self.push(Note::TestAge(self.who, addr));
        false
    }
}

/// The errno a system call would return for the simulation's error.
pub fn errno(e: &SimError) -> &'static str {
    match e {
        SimError::InvalidArgument(_) => "EINVAL",
        SimError::OutOfMemory => "ENOMEM",
        SimError::Fault(_) | SimError::Bus(_) => "EFAULT",
        SimError::Busy(_) => "EBUSY",
        SimError::Permission(_) => "EACCES",
        _ => "EIO",
    }
}

fn prot(p: Prot) -> SimProt {
    match p {
        Prot::Rw => SimProt::READ_WRITE,
        Prot::Ro => SimProt::READ,
        Prot::None => SimProt::NONE,
    }
}

fn at(page: u64) -> u64 {
    BASE + page * PAGE
}

struct Process {
    mm: Arc<AddressSpace>,
    _reg: ListRegistration,
}

fn subscribe(mm: Arc<AddressSpace>, who: Who, log: &Arc<Mutex<Vec<Note>>>) -> Process {
    let rec = Arc::new(Recorder {
        who,
        log: log.clone(),
    });
    let reg = mm
        .notifier()
        .register(rec)
        .expect("a new address space accepts subscribers");
    Process { mm, _reg: reg }
}

/// Runs `ops` on a fresh simulated process and returns what each did.
///
/// Writes are made as a process's `process_vm_writev` to itself would (an error of any
/// kind is `EFAULT`); every other operation returns the errno its system call would.
pub fn run(ops: &[Op]) -> Vec<Step> {
    let frames = Arc::new(FrameAllocator::new(1 << 16));
    let log = Arc::new(Mutex::new(Vec::new()));
    let parent = subscribe(AddressSpace::new(frames.clone()), Who::Parent, &log);
    let memfds: Vec<Arc<File>> = (0..MEMFDS)
        .map(|_| File::with_size(frames.clone(), MEMFD_PAGES * PAGE))
        .collect();
    let mut child: Option<Process> = None;
    let mut steps = Vec::with_capacity(ops.len());
    for op in ops {
        let mm = &parent.mm;
        let res: Result<(), SimError> = match op {
            Op::Mmap {
                at: a,
                len,
                kind,
                prot: p,
            } => {
                let kind = match *kind {
                    Kind::Anon => MapKind::AnonPrivate,
                    Kind::Shm => MapKind::AnonShared,
                    Kind::Memfd { id, off, shared } => MapKind::File {
                        file: memfds[id as usize].clone(),
                        offset: off * PAGE,
                        shared,
                    },
                };
                mm.mmap(len * PAGE, prot(*p), kind, Some(at(*a))).map(drop)
            }
            Op::Munmap { at: a, len } => mm.munmap(at(*a), len * PAGE),
            Op::Mprotect {
                at: a,
                len,
                prot: p,
            } => mm.mprotect(at(*a), len * PAGE, prot(*p)),
            Op::Madvise { at: a, len, advice } => {
                let advice = match advice {
                    Advice::DontNeed => mmu_sim::Advice::DontNeed,
                    Advice::Free => mmu_sim::Advice::Free,
                    Advice::PageOut => mmu_sim::Advice::PageOut,
                };
                mm.madvise(at(*a), len * PAGE, advice)
            }
            Op::Mremap {
                at: a,
                old,
                new,
                may_move,
                fixed,
            } => {
                let flags = MremapFlags {
                    may_move: *may_move || fixed.is_some(),
                    fixed: fixed.map(at),
                };
                mm.mremap(at(*a), old * PAGE, new * PAGE, flags).map(drop)
            }
            Op::Fork => {
                let c = mm.fork();
                child = Some(subscribe(c, Who::Child, &log));
                Ok(())
            }
            Op::Write { who, at: a } => {
                let target = match who {
                    Who::Parent => Some(mm),
                    Who::Child => child.as_ref().map(|c| &c.mm),
                };
                match target {
                    Some(m) => m.write(at(*a), *a + 1).map_err(|_| SimError::Fault(at(*a))),
                    None => Err(SimError::InvalidArgument("no child")),
                }
            }
            Op::ClearRefs { who } => {
                match who {
                    Who::Parent => mm.clear_soft_dirty(),
                    Who::Child => {
                        if let Some(c) = &child {
                            c.mm.clear_soft_dirty();
                        }
                    }
                }
                Ok(())
            }
            Op::ChildExit => {
                if let Some(c) = child.take() {
                    c.mm.exit();
                }
                Ok(())
            }
        };
        let notes: Vec<Note> = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .filter(Note::relevant)
            .collect();
        steps.push(Step {
            result: match res {
                Ok(()) => "ok".into(),
                Err(e) => errno(&e).into(),
            },
            notes,
        });
    }
    if let Some(c) = child.take() {
        c.mm.exit();
    }
    parent.mm.exit();
    steps
}
