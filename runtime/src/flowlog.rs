//! Flow logs: one JSON line per decision on a connection, with its reason
//! and the peer's verified identity, for audits and for the question every
//! policy author asks ("why was this refused, and by whom was it tried?").
//!
//! Decisions are made on the queue threads, which must never wait for a
//! disk: events go through a bounded channel to a writer thread of their
//! own, and when the channel is full an event is dropped and counted
//! (`flow_log_dropped`) rather than stalling the datapath. Sending costs
//! two reference-count increments and no allocation and wakes nobody; the
//! writer formats and writes in batches.

use crate::counters::Counters;
use crate::enforcer::Pu;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::Duration;
use trireme_tokens::handshake::Peer;

/// Events in flight at most; a burst beyond this is counted, not queued.
/// The writer drains it every `POLL`: room for 160,000 lines a second.
const CAPACITY: usize = 8192;

/// Which way the connection goes, seen from the PU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Opened by the peer towards the PU.
    Ingress,
    /// Opened by the PU.
    Egress,
}

/// Who was on the other end, as far as the decision knew it.
#[derive(Clone)]
pub enum Remote {
    /// Verified from its token: the signing node and the labels it vouched for.
    Token(Arc<Peer>),
    /// A PU of this node (the runtime's own knowledge, not a claim).
    Local(Arc<Pu>),
    /// No identity: judged by its address, or dropped before any was known.
    Address,
}

/// One decision.
#[derive(Clone)]
pub struct FlowEvent {
    pub at_ms: u64,
    pub pu: Option<Arc<Pu>>,
    pub direction: Direction,
    pub protocol: &'static str,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub allowed: bool,
    /// The counter the decision bumped (`ingress_allowed`, `token_replay`, ...).
    pub reason: &'static str,
    pub peer: Remote,
}

/// The sending half, owned by the enforcer.
pub struct FlowLog {
    tx: SyncSender<FlowEvent>,
    /// Lines per second at most (0: no limit).
    rate: u64,
    /// The current one-second window (wall seconds) and the lines sent in it.
    window: AtomicU64,
    sent: AtomicU64,
    /// Set by `reopen`, cleared by the writer when it has reopened the file.
    reopen: Arc<AtomicBool>,
}

impl FlowLog {
    fn new(tx: SyncSender<FlowEvent>, rate: u64, reopen: Arc<AtomicBool>) -> FlowLog {
        FlowLog {
            tx,
            rate,
            window: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            reopen,
        }
    }

    /// Open the file again at its path before the next lines (SIGHUP, after
    /// a log rotation renamed it).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }

    /// Never blocks: a full channel drops the event and counts it.
    ///
    /// Lines beyond `rate` in a second are suppressed and counted
    /// (`flow_log_suppressed`): a tokenless SYN costs an attacker nothing
    /// to spoof, and each would otherwise become a line on the node's disk.
    pub fn send(&self, ev: FlowEvent, counters: &Counters) {
        if self.rate > 0 {
            let now = ev.at_ms / 1000;
            if self.window.load(Relaxed) != now {
                // A new second: whoever swaps the window resets the count
                // (a few lines either side of the boundary do not matter).
                if self.window.swap(now, Relaxed) != now {
                    self.sent.store(0, Relaxed);
                }
            }
            if self.sent.fetch_add(1, Relaxed) >= self.rate {
                counters.inc("flow_log_suppressed");
                return;
            }
        }
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                counters.inc("flow_log_dropped")
            }
        }
    }
}

/// Where the lines go: `-` is standard output (a container's log), any
/// other value a file, appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    pub fn parse(s: &Path) -> Sink {
        if s.as_os_str() == "-" {
            Sink::Stdout
        } else {
            Sink::File(s.to_path_buf())
        }
    }

    fn open(&self) -> Result<Box<dyn Write + Send>, String> {
        match self {
            Sink::Stdout => Ok(Box::new(std::io::stdout())),
            Sink::File(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(|f| Box::new(f) as Box<dyn Write + Send>)
                .map_err(|e| format!("flow log {}: {e}", p.display())),
        }
    }
}

/// Open the sink (an error here stops the start: an operator who asked for
/// an audit trail must not silently run without one) and start the writer.
pub fn start(sink: &Sink, node: &str, rate: u64) -> Result<FlowLog, String> {
    let out = sink.open()?;
    let (tx, rx) = sync_channel(CAPACITY);
    let node = node.to_string();
    let sink = sink.clone();
    let reopen = Arc::new(AtomicBool::new(false));
    let flag = reopen.clone();
    std::thread::Builder::new()
        .name("flow-log".into())
        .spawn(move || write_loop(rx, out, &sink, &node, &flag))
        .map_err(|e| e.to_string())?;
    Ok(FlowLog::new(tx, rate, reopen))
}

/// How often the writer looks for lines.
const POLL: Duration = Duration::from_millis(50);

fn write_loop(
    rx: Receiver<FlowEvent>,
    out: Box<dyn Write + Send>,
    sink: &Sink,
    node: &str,
    reopen: &AtomicBool,
) {
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    loop {
        if reopen.swap(false, Relaxed) {
            let _ = w.flush();
            match sink.open() {
                Ok(out) => w = std::io::BufWriter::with_capacity(64 * 1024, out),
                // Keep writing to the file already open: lines in a
                // rotated file beat lines lost.
                Err(e) => eprintln!("trireme-runtime: {e}; still writing to the file open before"),
            }
        }
        // Drain, flush, sleep. The writer never waits *in* the channel: a
        // waiting receiver makes every send a wake-up (a futex call, and
        // this thread scheduled against the queue threads), which cost 16
        // µs per connection in the bench; a sleeping poller costs a send
        // two atomic operations. Lines reach the file within `POLL`.
        loop {
            match rx.try_recv() {
                Ok(ev) => {
                    if w.write_all(render(&ev, node).as_bytes()).is_ok() {
                        failed = false;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = w.flush();
                    return;
                }
            }
        }
        if w.flush().is_err() && !failed {
            failed = true;
            eprintln!("trireme-runtime: flow log {sink:?}: write failed; lines are lost");
        }
        std::thread::sleep(POLL);
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    node: &'a str,
    pu: Option<&'a str>,
    direction: Direction,
    verdict: &'static str,
    reason: &'static str,
    protocol: &'static str,
    local: SocketAddr,
    remote: SocketAddr,
    peer: Option<PeerLine<'a>>,
}

#[derive(Serialize)]
struct PeerLine<'a> {
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pu: Option<&'a str>,
    labels: Labels<'a>,
}

/// A token's labels or a local PU's identity: both serialize as a map.
#[derive(Serialize)]
#[serde(untagged)]
enum Labels<'a> {
    Claimed(&'a BTreeMap<String, String>),
    Known(&'a trireme_compiler::model::Identity),
}

/// One JSON line (with its newline).
pub fn render(ev: &FlowEvent, node: &str) -> String {
    let peer = match &ev.peer {
        Remote::Token(p) => Some(PeerLine {
            node: &p.node,
            pu: None,
            labels: Labels::Claimed(&p.labels),
        }),
        Remote::Local(p) => Some(PeerLine {
            node,
            pu: Some(&p.name),
            labels: Labels::Known(&p.identity),
        }),
        Remote::Address => None,
    };
    let time = jiff::Timestamp::from_millisecond(ev.at_ms as i64)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_default();
    let line = Line {
        time,
        node,
        pu: ev.pu.as_deref().map(|p| p.name.as_str()),
        direction: ev.direction,
        verdict: if ev.allowed { "allow" } else { "deny" },
        reason: ev.reason,
        protocol: ev.protocol,
        local: ev.local,
        remote: ev.remote,
        peer,
    };
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use trireme_compiler::model::Identity;

    fn event(peer: Remote, allowed: bool, reason: &'static str) -> FlowEvent {
        let mut id = Identity::new();
        id.insert("role", "backend");
        FlowEvent {
            at_ms: 1_795_335_104_854,
            pu: Some(Arc::new(Pu::new("be", id, vec![]))),
            direction: Direction::Ingress,
            protocol: "tcp",
            local: "198.18.1.20:80".parse().unwrap(),
            remote: "[fd00::1:10]:40000".parse().unwrap(),
            allowed,
            reason,
            peer,
        }
    }

    #[test]
    fn a_line_names_the_decision_and_the_verified_peer() {
        let peer = Arc::new(Peer {
            node: "node-a".into(),
            labels: [("role".to_string(), "front\"end".to_string())].into(),
            not_before: 0,
            expires: 0,
            view: Default::default(),
        });
        let line = render(
            &event(Remote::Token(peer), true, "ingress_allowed"),
            "node-b",
        );
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2026-11-22T08:11:44.854Z");
        assert_eq!(v["node"], "node-b");
        assert_eq!(v["pu"], "be");
        assert_eq!(v["direction"], "ingress");
        assert_eq!(v["verdict"], "allow");
        assert_eq!(v["reason"], "ingress_allowed");
        assert_eq!(v["local"], "198.18.1.20:80");
        assert_eq!(v["remote"], "[fd00::1:10]:40000");
        assert_eq!(v["peer"]["node"], "node-a");
        assert_eq!(v["peer"]["labels"]["role"], "front\"end");
        assert!(v["peer"].get("pu").is_none());

        let local = Arc::new(Pu::new("fe", Identity::new(), vec![]));
        let v: serde_json::Value = serde_json::from_str(&render(
            &event(Remote::Local(local), false, "egress_denied"),
            "n",
        ))
        .unwrap();
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["peer"]["node"], "n");
        assert_eq!(v["peer"]["pu"], "fe");
        let v: serde_json::Value =
            serde_json::from_str(&render(&event(Remote::Address, false, "token_replay"), "n"))
                .unwrap();
        assert!(v["peer"].is_null());
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = sync_channel(1);
        let log = FlowLog::new(tx, 0, Default::default());
        let c = Counters::default();
        log.send(event(Remote::Address, false, "a"), &c);
        log.send(event(Remote::Address, false, "b"), &c);
        assert_eq!(c.get("flow_log_dropped"), 1);
        assert_eq!(rx.try_recv().map(|e| e.reason).ok(), Some("a"));
        drop(rx);
        log.send(event(Remote::Address, false, "c"), &c);
        assert_eq!(c.get("flow_log_dropped"), 2);
    }

    #[test]
    fn the_writer_appends_lines_and_flushes_when_idle() {
        let dir = std::env::temp_dir().join(format!("trflowlog{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let log = start(&Sink::parse(&path), "n", 0).unwrap();
        let c = Counters::default();
        log.send(event(Remote::Address, true, "ingress_allowed_by_ip"), &c);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let text = loop {
            let t = std::fs::read_to_string(&path).unwrap();
            if t.lines().count() == 2 || std::time::Instant::now() > deadline {
                break t;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(text.starts_with("earlier\n{\"time\""), "{text}");
        // A rotation: the file is renamed, SIGHUP asks for a reopen, and
        // the next lines go to a new file at the path.
        std::fs::rename(&path, dir.join("f.jsonl.1")).unwrap();
        log.reopen();
        log.send(event(Remote::Address, true, "ingress_allowed_by_ip"), &c);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !path.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let old = std::fs::read_to_string(dir.join("f.jsonl.1")).unwrap();
        assert_eq!(old.lines().count(), 2);
        assert!(start(&Sink::parse(&dir.join("no/such/dir/f")), "n", 0).is_err());
        assert_eq!(Sink::parse(Path::new("-")), Sink::Stdout);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod rate {
    use super::*;

    #[test]
    fn lines_beyond_the_rate_in_a_second_are_suppressed_and_counted() {
        let (tx, rx) = sync_channel(100);
        let log = FlowLog::new(tx, 3, Default::default());
        let c = Counters::default();
        let at = |ms: u64| FlowEvent {
            at_ms: ms,
            pu: None,
            direction: Direction::Ingress,
            protocol: "tcp",
            local: "198.18.0.1:80".parse().unwrap(),
            remote: "198.18.0.2:9".parse().unwrap(),
            allowed: false,
            reason: "ingress_denied_by_ip",
            peer: Remote::Address,
        };
        for ms in [5_000, 5_100, 5_200, 5_300, 5_999] {
            log.send(at(ms), &c);
        }
        assert_eq!(c.get("flow_log_suppressed"), 2);
        // The next second starts afresh.
        log.send(at(6_000), &c);
        assert_eq!(rx.try_iter().count(), 4);
        assert_eq!(c.get("flow_log_suppressed"), 2);
    }
}
