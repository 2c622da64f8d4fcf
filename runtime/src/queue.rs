//! NFQUEUE workers: one OS thread per (PU namespace, queue number), each
//! entering the PU's network namespace with `setns` before it opens its
//! netlink socket, so that the socket (and the queue it binds) belong to
//! that namespace. Never run on an async executor: `setns` changes the
//! calling thread, and `recv` blocks.

use crate::enforcer::{Enforcer, Hook, Verdict};
use crate::firewall::{AUTH_MARK, PROVISIONAL_MARK, REVOKE_MARK};
use crate::flows::FlowKey;
use nfq::{Queue, Verdict as NfVerdict};
use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
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
/// How often a queue with held segments looks at whether their flow was
/// authorized (on another queue) or their deadline passed.
const HOLD_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// A segment kept without a verdict until its flow is authorized.
struct Held {
    key: FlowKey,
    msg: nfq::Message,
    deadline: std::time::Instant,
}

/// Netfilter hook numbers (uapi netfilter.h).
const NF_INET_LOCAL_IN: u8 = 1;
const NF_INET_LOCAL_OUT: u8 = 3;

pub struct Worker {
    pub pu: usize,
    pub netns: PathBuf,
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Start a worker; returns once its queue is bound (or failed to bind),
/// so that the caller can report a setup error instead of a silent hole.
pub fn spawn(
    w: Worker,
    enforcer: Arc<Enforcer>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let name = format!("nfq-{}-{}", w.pu, w.queue);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut q = match open(&w) {
                Ok(q) => {
                    // Before the node reports ready: the first draw of a
                    // process seeds the DRBG (~30 ms of CPU jitter here).
                    trireme_tokens::handshake::prepare_thread();
                    let _ = tx.send(Ok(()));
                    q
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            serve(&mut q, &w, &enforcer, &stop);
        })
        .map_err(|e| e.to_string())?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("worker thread ended during setup".into()),
    }
}

/// Pin the calling thread to the worker's CPUs, enter its namespace and
/// bind its queue. Public so that the benchmark's floor opens its queues
/// exactly as the workers do.
pub fn open(w: &Worker) -> Result<Queue, String> {
    let ctx = |what: &str, e: &dyn std::fmt::Display| {
        format!("queue {} in {}: {what}: {e}", w.queue, w.netns.display())
    };
    if !w.cpus.is_empty() {
        let mut set = nix::sched::CpuSet::new();
        for c in &w.cpus {
            set.set(*c).map_err(|e| ctx(&format!("cpu {c}"), &e))?;
        }
        // This thread only (pid 0): the runtime's other threads stay free.
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .map_err(|e| ctx(&format!("cpus {:?}", w.cpus), &e))?;
    }
    let f = File::open(&w.netns).map_err(|e| ctx("open netns", &e))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| ctx("setns", &e))?;
    let mut q = Queue::open().map_err(|e| ctx("open", &e))?;
    q.bind(w.queue).map_err(|e| ctx("bind", &e))?;
    q.set_queue_max_len(w.queue, w.max_len)
        .map_err(|e| ctx("max len", &e))?;
    // Whole packets: we rewrite them.
    q.set_copy_range(w.queue, 0xffff)
        .map_err(|e| ctx("copy range", &e))?;
    Ok(q)
}

/// The next message: busy-poll until `spin` after the last packet, then block.
fn recv(
    q: &mut Queue,
    last: std::time::Instant,
    spin: std::time::Duration,
) -> std::io::Result<nfq::Message> {
    if !spin.is_zero() {
        q.set_nonblocking(true);
        while last.elapsed() < spin {
            match q.recv() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                other => {
                    q.set_nonblocking(false);
                    return other;
                }
            }
        }
        q.set_nonblocking(false);
    }
    q.recv()
}

/// The next message, or `None` after `HOLD_POLL` (the socket has no
/// receive timeout in nfq 0.2, so this polls; it only runs while a segment
/// is held, which is rare and short).
fn recv_poll(q: &mut Queue) -> std::io::Result<Option<nfq::Message>> {
    q.set_nonblocking(true);
    let until = std::time::Instant::now() + HOLD_POLL;
    let r = loop {
        match q.recv() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= until {
                    break Ok(None);
                }
                std::thread::sleep(HOLD_POLL / 4);
            }
            other => break other.map(Some),
        }
    };
    q.set_nonblocking(false);
    r
}

fn verdict(q: &mut Queue, msg: nfq::Message, enforcer: &Enforcer) {
    if q.verdict(msg).is_err() {
        enforcer.counters.inc("queue_verdict_errors");
    }
}

/// Accept, in arrival order, held segments whose flow is now authorized
/// (by this queue's verdict on the token ACK, or by another queue's: with
/// CPU fanout a flow's packets meet different queues); drop those whose
/// flow was not authorized in time.
fn sweep(q: &mut Queue, held: &mut VecDeque<Held>, enforcer: &Enforcer) {
    let now = std::time::Instant::now();
    let now_ms = now_ms();
    let mut i = 0;
    while i < held.len() {
        let ok = enforcer.authorized(&held[i].key, now_ms);
        if !ok && held[i].deadline > now {
            i += 1;
            continue;
        }
        let Some(mut h) = held.remove(i) else { break };
        if ok {
            h.msg.set_verdict(NfVerdict::Accept);
            enforcer.counters.inc("released");
        } else {
            h.msg.set_verdict(NfVerdict::Drop);
            enforcer.counters.inc("dropped");
            enforcer.counters.inc("ack_without_token");
        }
        verdict(q, h.msg, enforcer);
        enforcer.unhold();
    }
}

fn serve(q: &mut Queue, w: &Worker, enforcer: &Enforcer, stop: &AtomicBool) {
    let spin = std::time::Duration::from_micros(w.spin_us);
    let mut last = std::time::Instant::now();
    let mut held: VecDeque<Held> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        let next = if held.is_empty() {
            recv(q, last, spin).map(Some)
        } else {
            sweep(q, &mut held, enforcer);
            recv_poll(q)
        };
        let mut msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                enforcer.counters.inc("queue_recv_errors");
                eprintln!(
                    "trireme-runtime: queue {} in {}: {e}",
                    w.queue,
                    w.netns.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let hook = match msg.get_hook() {
            NF_INET_LOCAL_IN => Hook::In,
            NF_INET_LOCAL_OUT => Hook::Out,
            _ => {
                msg.set_verdict(NfVerdict::Drop);
                enforcer.counters.inc("unexpected_hook");
                let _ = q.verdict(msg);
                continue;
            }
        };
        let v = enforcer.handle(w.pu, hook, msg.get_payload(), now_ms());
        last = std::time::Instant::now();
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
                if held.len() < HOLD_MAX && enforcer.try_hold() {
                    enforcer.counters.inc("held");
                    held.push_back(Held {
                        key,
                        msg,
                        deadline: last + HOLD,
                    });
                    continue;
                }
                enforcer.counters.inc("dropped");
                enforcer.counters.inc("hold_full");
                msg.set_verdict(NfVerdict::Drop);
            }
            Verdict::Drop(_) => msg.set_verdict(NfVerdict::Drop),
        }
        verdict(q, msg, enforcer);
        // After the ACK's own verdict, which re-injected it first. Only when
        // something is held: the common path pays nothing.
        if authorized && !held.is_empty() {
            sweep(q, &mut held, enforcer);
        }
    }
}
