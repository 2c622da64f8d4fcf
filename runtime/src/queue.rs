//! NFQUEUE workers: one OS thread per queue number (one per CPU by
//! default), serving that queue in every PU's network namespace. It enters
//! each namespace with `setns` before it opens that PU's netlink socket, so
//! that the socket (and the queue it binds) belong to the namespace; then
//! it polls them all with epoll. Never run on an async executor: `setns`
//! changes the calling thread, and the poll blocks.
//!
//! A reload adds and removes PUs while the workers run: each worker takes
//! commands on a channel, woken by an eventfd in its epoll set, so that
//! the queue of a new PU is opened by the thread that will poll it.

use crate::enforcer::{Enforcer, Hook, Verdict};
use crate::firewall::{AUTH_MARK, PROVISIONAL_MARK, REVOKE_MARK};
use crate::flows::{FlowKey, now_ms};
use nfq::{Queue, Verdict as NfVerdict};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

/// How long a held segment waits for its flow's token ACK. The ACK it
/// overtook follows within microseconds; a lost one is re-sent after the
/// responder's SYN-ACK timer (1 s), and the initiator re-sends its data too.
const HOLD: std::time::Duration = std::time::Duration::from_millis(1000);
/// Held segments per queue at most; beyond, a new one is dropped. (The
/// node as a whole holds at most `Enforcer::HOLD_MAX`: a held message
/// keeps its receive buffer, about 72 KiB, alive.)
const HOLD_MAX: usize = 32;
/// How often a worker with held segments looks at whether their flow was
/// authorized (on another queue) or their deadline passed.
const HOLD_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// A segment kept without a verdict until its flow is authorized.
struct Held {
    key: FlowKey,
    msg: nfq::Message,
    deadline: std::time::Instant,
}

/// Netfilter hook numbers (uapi netfilter.h).
const NF_INET_LOCAL_IN: u8 = 1;
const NF_INET_LOCAL_OUT: u8 = 3;

/// One worker thread: queue number `queue` in every PU's namespace, all
/// polled by this one thread. Threads are bounded by CPUs (or `queues`),
/// not by PUs × CPUs; and a handshake between two PUs of this node runs
/// on one thread, its packets handed from one PU's queue to the other's
/// without a sleep or a switch between threads.
pub struct Worker {
    /// The PUs' network namespaces at start, in slot order (a PU's slot
    /// is its position); `Control` adds and removes PUs later.
    pub pus: Vec<PathBuf>,
    pub queue: u16,
    /// Kernel queue length; packets beyond it are dropped (fail-closed).
    pub max_len: u32,
    /// After a packet, poll this long before sleeping: the next packet of a
    /// handshake usually follows within tens of µs, and waking a sleeping
    /// thread (on a VM, an idle vCPU) costs more than that.
    pub spin_us: u64,
    /// CPUs this worker may run on (empty: any).
    pub cpus: Vec<usize>,
}

/// A change to a worker's PUs.
enum Command {
    /// Open the queue in this namespace for the PU in this slot.
    Add { slot: usize, netns: PathBuf },
    /// Close the slot's queue (its held segments are dropped with it).
    Remove { slot: usize },
}

type Reply = mpsc::Sender<Result<(), String>>;

/// epoll's token for the command eventfd (sources use their slot).
const CONTROL: u64 = u64::MAX;

/// How a reload changes a running worker's PUs. Each call returns once
/// the worker has done it, so that the caller programs a new PU's rules
/// only after its queue listens (rules that queue to nobody drop).
pub struct Control {
    queue: u16,
    tx: mpsc::Sender<(Command, Reply)>,
    wake: Arc<EventFd>,
}

impl Control {
    fn ask(&self, c: Command) -> Result<(), String> {
        let (rtx, rrx) = mpsc::channel();
        let gone = || format!("queue {}: the worker thread has ended", self.queue);
        self.tx.send((c, rtx)).map_err(|_| gone())?;
        self.wake
            .write(1)
            .map_err(|e| format!("queue {}: wake: {e}", self.queue))?;
        match rrx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("queue {}: no answer in 10 s", self.queue))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }

    /// Serve the PU in `slot` (a slot this worker does not serve yet).
    pub fn add(&self, slot: usize, netns: &Path) -> Result<(), String> {
        self.ask(Command::Add {
            slot,
            netns: netns.to_path_buf(),
        })
    }

    /// Stop serving the PU in `slot`: its socket closes, and the kernel
    /// drops what was queued on it.
    pub fn remove(&self, slot: usize) -> Result<(), String> {
        self.ask(Command::Remove { slot })
    }
}

/// A running worker.
pub struct Handle {
    pub thread: std::thread::JoinHandle<()>,
    pub control: Control,
    /// True while the thread runs (the liveness probe reads it).
    pub alive: Arc<AtomicBool>,
}

/// Start a worker; returns once all its queues are bound (or one failed
/// to bind), so that the caller can report a setup error instead of a
/// silent hole.
pub fn spawn(w: Worker, enforcer: Arc<Enforcer>, stop: Arc<AtomicBool>) -> Result<Handle, String> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let (ctl_tx, ctl_rx) = mpsc::channel();
    let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(|e| format!("queue {}: eventfd: {e}", w.queue))?;
    let control = Control {
        queue: w.queue,
        tx: ctl_tx,
        wake: wake.clone(),
    };
    let name = format!("nfq-{}", w.queue);
    let alive = Arc::new(AtomicBool::new(true));
    let guard = crate::health::AliveGuard(alive.clone());
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let _alive = guard;
            let pinned = pin(&w.cpus).map_err(|e| format!("queue {}: {e}", w.queue));
            let opened = pinned.and_then(|()| {
                w.pus
                    .iter()
                    .map(|netns| source(netns, &w).map(Some))
                    .collect::<Result<Vec<_>, _>>()
            });
            let mut sources = match opened {
                Ok(s) => {
                    // Before the node reports ready: the first draw of a
                    // process seeds the DRBG (~30 ms of CPU jitter here).
                    trireme_tokens::handshake::prepare_thread();
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let ep = match poller(&sources, &wake) {
                Ok(ep) => ep,
                Err(e) => {
                    let _ = tx.send(Err(format!("queue {}: epoll: {e}", w.queue)));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            let ctl = Commands {
                rx: ctl_rx,
                wake: &wake,
            };
            serve(&mut sources, &ep, &ctl, &w, &enforcer, &stop);
        })
        .map_err(|e| e.to_string())?;
    match rx.recv() {
        Ok(Ok(())) => Ok(Handle {
            thread: handle,
            control,
            alive,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("worker thread ended during setup".into()),
    }
}

/// A PU's queue for worker `w`, opened in its namespace.
fn source(netns: &Path, w: &Worker) -> Result<Source, String> {
    let (mut q, fd) = open(netns, w.queue, w.max_len)?;
    q.set_nonblocking(true);
    Ok(Source {
        q,
        fd,
        held: VecDeque::new(),
    })
}

/// Pin the calling thread to `cpus` (none: leave it free). This thread
/// only: the runtime's other threads stay free.
pub fn pin(cpus: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        set.set(*c).map_err(|e| format!("cpu {c}: {e}"))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("cpus {cpus:?}: {e}"))
}

/// Serializes `open`, so that the netfilter netlink socket that appears
/// at the probed descriptor number is the one this `open` created.
static OPENING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether `fd` is a NETLINK_NETFILTER socket.
fn is_netfilter_socket(fd: RawFd) -> bool {
    let opt = |name| {
        let mut val: nix::libc::c_int = 0;
        let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
        // SAFETY: an int-sized option into an int; a closed or non-socket
        // fd only makes the call fail.
        let r = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                name,
                &mut val as *mut _ as *mut nix::libc::c_void,
                &mut len,
            )
        };
        (r == 0).then_some(val)
    };
    opt(nix::libc::SO_DOMAIN) == Some(nix::libc::AF_NETLINK)
        && opt(nix::libc::SO_PROTOCOL) == Some(nix::libc::NETLINK_NETFILTER)
}

/// A new `Queue` and its socket's descriptor, which the `nfq` crate does
/// not expose. `socket()` returns the lowest free descriptor: probe which
/// one that is, open the queue, and check that a netfilter socket is now
/// there. Only queue openings (serialized here) create such sockets in
/// this process, so one found at the probed number is this queue's. If
/// another thread took the number in between, try again. Constant time
/// per queue, whatever the number of sockets already open.
fn queue_with_fd() -> Result<(Queue, RawFd), String> {
    use std::os::fd::AsRawFd;
    let _one = OPENING.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..8 {
        let probe = File::open("/dev/null").map_err(|e| e.to_string())?;
        let fd = probe.as_raw_fd();
        drop(probe);
        let q = Queue::open().map_err(|e| e.to_string())?;
        if is_netfilter_socket(fd) {
            return Ok((q, fd));
        }
    }
    Err("its socket was not at the lowest free descriptor (8 tries)".into())
}

/// Enter `netns` and bind queue `queue` there; returns the queue and its
/// socket (for epoll: the `nfq` crate does not expose it). The socket
/// stays in the namespace it was opened in whatever the thread enters
/// next. Public so that the benchmark's floor opens its queues exactly as
/// the workers do.
pub fn open(netns: &Path, queue: u16, max_len: u32) -> Result<(Queue, RawFd), String> {
    let ctx = |what: &str, e: &dyn std::fmt::Display| {
        format!("queue {queue} in {}: {what}: {e}", netns.display())
    };
    let f = File::open(netns).map_err(|e| ctx("open netns", &e))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| ctx("setns", &e))?;
    let (mut q, fd) = queue_with_fd().map_err(|e| ctx("open", &e))?;
    q.bind(queue).map_err(|e| {
        // The kernel answers EPERM when another socket has the queue.
        if e.raw_os_error() == Some(nix::libc::EPERM) {
            ctx(
                "bind",
                &"another process serves this queue in this namespace (another enforcer?)",
            )
        } else {
            ctx("bind", &e)
        }
    })?;
    q.set_queue_max_len(queue, max_len)
        .map_err(|e| ctx("max len", &e))?;
    // Whole packets: we rewrite them.
    q.set_copy_range(queue, 0xffff)
        .map_err(|e| ctx("copy range", &e))?;
    Ok((q, fd))
}

/// One PU's queue in a worker, with the segments it holds.
struct Source {
    q: Queue,
    fd: RawFd,
    held: VecDeque<Held>,
}

/// The worker's end of its `Control`.
struct Commands<'a> {
    rx: mpsc::Receiver<(Command, Reply)>,
    wake: &'a EventFd,
}

fn watch(ep: &Epoll, s: &Source, slot: usize) -> nix::Result<()> {
    // SAFETY: the socket is owned by `s.q`; it leaves the epoll set
    // before it closes (a removal), or both go when the worker returns.
    let fd = unsafe { BorrowedFd::borrow_raw(s.fd) };
    ep.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, slot as u64))
}

/// An epoll set over the sources' sockets (level-triggered: a socket
/// left with packets after a batch is reported again) and the command
/// eventfd.
fn poller(sources: &[Option<Source>], wake: &EventFd) -> nix::Result<Epoll> {
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (slot, s) in sources.iter().enumerate() {
        if let Some(s) = s {
            watch(&ep, s, slot)?;
        }
    }
    ep.add(wake, EpollEvent::new(EpollFlags::EPOLLIN, CONTROL))?;
    Ok(ep)
}

/// Carry out the pending commands; returns how many held segments went
/// with removed sources.
fn commands(
    sources: &mut Vec<Option<Source>>,
    ep: &Epoll,
    ctl: &Commands,
    w: &Worker,
    enforcer: &Enforcer,
) -> usize {
    let _ = ctl.wake.read();
    let mut dropped = 0;
    while let Ok((c, reply)) = ctl.rx.try_recv() {
        let r = match c {
            Command::Add { slot, netns } => {
                if sources.len() <= slot {
                    sources.resize_with(slot + 1, || None);
                }
                if sources[slot].is_some() {
                    Err(format!("queue {}: slot {slot} is taken", w.queue))
                } else {
                    source(&netns, w).and_then(|s| {
                        watch(ep, &s, slot)
                            .map_err(|e| format!("queue {}: epoll: {e}", w.queue))?;
                        sources[slot] = Some(s);
                        Ok(())
                    })
                }
            }
            Command::Remove { slot } => {
                if let Some(s) = sources.get_mut(slot).and_then(Option::take) {
                    // SAFETY: as in `watch`; the socket is still open.
                    let fd = unsafe { BorrowedFd::borrow_raw(s.fd) };
                    let _ = ep.delete(fd);
                    for _ in &s.held {
                        enforcer.unhold();
                        enforcer.count_drop("pu_removed");
                    }
                    dropped += s.held.len();
                }
                Ok(())
            }
        };
        let _ = reply.send(r);
    }
    dropped
}

/// Packets taken from one queue before looking at the others: a flood
/// on one PU delays the others' handshakes by at most one batch.
const BATCH: usize = 64;

fn verdict(q: &mut Queue, msg: nfq::Message, enforcer: &Enforcer) {
    if q.verdict(msg).is_err() {
        enforcer.counters.inc("queue_verdict_errors");
    }
}

/// Accept, in arrival order, held segments whose flow is now authorized
/// (by this queue's verdict on the token ACK, or by another queue's: with
/// CPU fanout a flow's packets meet different queues); drop those whose
/// flow was not authorized in time.
fn sweep(s: &mut Source, enforcer: &Enforcer) {
    let now = std::time::Instant::now();
    let now_ms = now_ms();
    let mut i = 0;
    while i < s.held.len() {
        let ok = enforcer.authorized(&s.held[i].key, now_ms);
        if !ok && s.held[i].deadline > now {
            i += 1;
            continue;
        }
        let Some(mut h) = s.held.remove(i) else { break };
        if ok {
            h.msg.set_verdict(NfVerdict::Accept);
            enforcer.counters.inc("released");
        } else {
            h.msg.set_verdict(NfVerdict::Drop);
            enforcer.drop_held(&h.key, "ack_without_token");
        }
        verdict(&mut s.q, h.msg, enforcer);
        enforcer.unhold();
    }
}

/// The worker's loop. What it does per wake-up does not grow with the
/// number of PUs: it visits the sockets epoll reports, and those whose
/// last batch was full.
fn serve(
    sources: &mut Vec<Option<Source>>,
    ep: &Epoll,
    ctl: &Commands,
    w: &Worker,
    enforcer: &Enforcer,
    stop: &AtomicBool,
) {
    let spin = std::time::Duration::from_micros(w.spin_us);
    let mut last = std::time::Instant::now();
    let mut events = vec![EpollEvent::empty(); 256];
    // Sources whose last batch ended full: their socket (or the crate's
    // buffer) may still hold packets that epoll would not report again.
    let (mut pending, mut full): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    // Segments held by all the sources together.
    let mut held = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let spinning = !spin.is_zero() && last.elapsed() < spin;
        let timeout = if held > 0 || !pending.is_empty() || spinning {
            EpollTimeout::ZERO
        } else {
            EpollTimeout::NONE
        };
        let n = match ep.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                enforcer.counters.inc("queue_recv_errors");
                eprintln!("trireme-runtime: queue {}: epoll: {e}", w.queue);
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if events[..n].iter().any(|e| e.data() == CONTROL) {
            held -= commands(sources, ep, ctl, w, enforcer);
            // Removed sources leave this list; reported events of theirs
            // find an empty slot below.
            pending.retain(|&i| sources[i].is_some());
        }
        // A source both reported and pending is drained twice: the second
        // time costs one empty non-blocking read.
        let ready = events[..n]
            .iter()
            .map(|e| e.data())
            .filter(|&d| d != CONTROL)
            .map(|d| d as usize);
        for i in ready.chain(pending.drain(..)) {
            let Some(s) = sources.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            let before = s.held.len();
            let got = drain(s, i, w, enforcer);
            held = held - before + s.held.len();
            if got == BATCH && !full.contains(&i) {
                full.push(i);
            }
            if got > 0 && !spin.is_zero() {
                last = std::time::Instant::now();
            }
        }
        std::mem::swap(&mut pending, &mut full);
        if held > 0 {
            for s in sources.iter_mut().flatten().filter(|s| !s.held.is_empty()) {
                sweep(s, enforcer);
            }
            held = sources.iter().flatten().map(|s| s.held.len()).sum();
            if n == 0 && pending.is_empty() {
                // Nothing arrived: look again in a while (held segments
                // are rare and short-lived; this wait is not on the
                // common path).
                std::thread::sleep(HOLD_POLL);
            }
        }
    }
}

/// Handle up to `BATCH` packets of one queue; returns how many.
fn drain(s: &mut Source, pu: usize, w: &Worker, enforcer: &Enforcer) -> usize {
    for done in 0..BATCH {
        let mut msg = match s.q.recv() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return done,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return done,
            // The kernel's answer to a verdict on a packet it no longer
            // holds: it flushed the queue while we decided (a netfilter
            // hook unregistered in the namespace, an interface gone).
            // The packet is lost, not the socket: count it and go on.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {
                enforcer.counters.inc("queue_stale_verdicts");
                continue;
            }
            Err(e) => {
                enforcer.counters.inc("queue_recv_errors");
                eprintln!("trireme-runtime: queue {} of pu slot {pu}: {e}", w.queue);
                // A socket that keeps failing must not spin this thread
                // (nor flood the log).
                std::thread::sleep(std::time::Duration::from_millis(10));
                return done;
            }
        };
        let hook = match msg.get_hook() {
            NF_INET_LOCAL_IN => Hook::In,
            NF_INET_LOCAL_OUT => Hook::Out,
            _ => {
                msg.set_verdict(NfVerdict::Drop);
                enforcer.counters.inc("unexpected_hook");
                verdict(&mut s.q, msg, enforcer);
                continue;
            }
        };
        let v = enforcer.handle(pu, hook, msg.get_payload(), now_ms());
        let authorized = matches!(v, Verdict::Authorize(_));
        match v {
            Verdict::Accept => msg.set_verdict(NfVerdict::Accept),
            Verdict::Rewrite(p) => {
                msg.set_payload(p);
                msg.set_verdict(NfVerdict::Accept);
            }
            Verdict::Authorize(p) => {
                if let Some(p) = p {
                    msg.set_payload(p);
                }
                // Re-run the chain once with our mark: its first rule
                // copies the mark to conntrack, then accepts.
                msg.set_nfmark(msg.get_nfmark() | AUTH_MARK);
                msg.set_verdict(NfVerdict::Repeat);
            }
            Verdict::Provisional(p) => {
                msg.set_payload(p);
                msg.set_nfmark(msg.get_nfmark() | AUTH_MARK | PROVISIONAL_MARK);
                msg.set_verdict(NfVerdict::Repeat);
            }
            Verdict::Revoke(p) => {
                msg.set_payload(p);
                msg.set_nfmark(msg.get_nfmark() | REVOKE_MARK);
                msg.set_verdict(NfVerdict::Repeat);
            }
            Verdict::Hold(key) => {
                if s.held.len() < HOLD_MAX && enforcer.try_hold() {
                    enforcer.counters.inc("held");
                    s.held.push_back(Held {
                        key,
                        msg,
                        deadline: std::time::Instant::now() + HOLD,
                    });
                    continue;
                }
                enforcer.drop_held(&key, "hold_full");
                msg.set_verdict(NfVerdict::Drop);
            }
            Verdict::Drop(_) => msg.set_verdict(NfVerdict::Drop),
        }
        verdict(&mut s.q, msg, enforcer);
        // After the ACK's own verdict, which re-injected it first. Only when
        // something is held: the common path pays nothing.
        if authorized && !s.held.is_empty() {
            sweep(s, enforcer);
        }
    }
    BATCH
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptor found is the queue's own, even while other threads
    /// open and close descriptors: dropping the queue closes exactly it.
    #[test]
    fn each_queue_is_found_at_its_own_socket() {
        let stop = Arc::new(AtomicBool::new(false));
        let churn: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let f = File::open("/dev/null").unwrap();
                        std::hint::black_box(&f);
                    }
                })
            })
            .collect();
        let openers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..25)
                        .map(|_| queue_with_fd().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let opened: Vec<(Queue, RawFd)> = openers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        stop.store(true, Ordering::Relaxed);
        for h in churn {
            h.join().unwrap();
        }
        assert_eq!(opened.len(), 100);
        let mut fds: Vec<RawFd> = opened.iter().map(|(_, fd)| *fd).collect();
        fds.sort();
        fds.dedup();
        assert_eq!(fds.len(), 100, "one descriptor per queue");
        for (q, fd) in opened {
            assert!(is_netfilter_socket(fd));
            drop(q);
            assert!(!is_netfilter_socket(fd), "fd {fd} was not the queue's");
        }
    }
}
