//! Prometheus metrics: the enforcer's counters, its handshake latencies
//! and the kernel's own view of each PU (its queues, and the flows our
//! nftables table decided by address), in the text exposition format
//! (version 0.0.4), rendered when scraped.
//!
//! The counters stay the lock-free table the queue threads already bump;
//! this module only reads it, so a scrape costs the datapath nothing. The
//! kernel's queue figures (packets waiting, and those it dropped because a
//! queue was full or its reader's socket was) are read from each PU's
//! namespace at scrape time: with the default fail-closed queues, a full
//! queue is the one drop no userspace counter can see.

use crate::enforcer::Enforcer;
use std::fmt::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the latency buckets, in µs: a handshake between PUs
/// of one VM takes tens of µs to userspace, one across a network its
/// round trip, and anything past a second is a retransmission.
const BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 250_000, 1_000_000,
];

/// A fixed-bucket latency histogram, bumped from any queue thread without
/// a lock.
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = match BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// The kernel's figures for the queues of one namespace
/// (`/proc/net/netfilter/nfnetlink_queue`), summed over its queues.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub queues: u64,
    /// Packets waiting for a verdict now.
    pub waiting: u64,
    /// Dropped because the queue was full (fail-closed).
    pub queue_dropped: u64,
    /// Dropped because the reader's socket buffer was full.
    pub user_dropped: u64,
}

/// Parse the kernel's table: one line per bound queue, `queue_number
/// peer_portid queue_total copy_mode copy_range queue_dropped user_dropped
/// id_sequence 1`. A line of another shape is skipped, not guessed at.
pub fn parse_queue_stats(text: &str) -> QueueStats {
    let mut s = QueueStats::default();
    for line in text.lines() {
        let f: Vec<u64> = match line.split_whitespace().map(str::parse).collect() {
            Ok(f) => f,
            Err(_) => continue,
        };
        if f.len() < 7 {
            continue;
        }
        s.queues += 1;
        s.waiting += f[2];
        s.queue_dropped += f[5];
        s.user_dropped += f[6];
    }
    s
}

/// What the kernel says of one PU's namespace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelStats {
    pub queues: QueueStats,
    /// Flows our nftables table decided by address: only these counters
    /// see them (no userspace counter does).
    pub by_address: crate::nft::Counted,
}

/// The figures of the PU in `netns`, read from inside it (`/proc/net` is
/// per namespace, and `thread-self` is the thread that entered it; the
/// netlink socket is opened there too).
pub fn kernel_stats(netns: &Path) -> Result<KernelStats, String> {
    crate::netns::run_in(netns, || {
        let queues =
            match std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue") {
                Ok(t) => parse_queue_stats(&t),
                // No queue bound in this namespace (yet): nothing waits.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => QueueStats::default(),
                Err(e) => return Err(format!("nfnetlink_queue: {e}")),
            };
        Ok(KernelStats {
            queues,
            by_address: crate::nft::counters()?,
        })
    })
}

/// A label value in the exposition format.
fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Counters that other families report under labels, or that are sums of
/// other lines: not repeated as `trireme_events_total`.
fn reported_elsewhere(name: &str) -> bool {
    name == "dropped" || name.starts_with("handled_")
}

/// Everything a scrape reports. `kernel` holds each PU's kernel figures
/// (or why they could not be read).
pub fn render(
    e: &Enforcer,
    node: &str,
    kernel: &[(String, Result<KernelStats, String>)],
) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let policy = e.policy();
    family(
        &mut out,
        "trireme_info",
        "gauge",
        "The runtime's version, node and ruleset in force (always 1).",
    );
    let _ = writeln!(
        out,
        "trireme_info{{version=\"{}\",node=\"{}\",ruleset=\"sha256:{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        esc(node),
        esc(&policy.hash)
    );
    family(&mut out, "trireme_pus", "gauge", "PUs enforced.");
    let _ = writeln!(out, "trireme_pus {}", e.pus().len());
    let (flows, evicted, expired) = e.flow_stats();
    family(
        &mut out,
        "trireme_flows_in_handshake",
        "gauge",
        "Connections in the flow table (mid-handshake, or just decided).",
    );
    let _ = writeln!(out, "trireme_flows_in_handshake {flows}");
    family(
        &mut out,
        "trireme_flows_evicted_total",
        "counter",
        "Flow-table entries evicted because the table was full (maxFlows).",
    );
    let _ = writeln!(out, "trireme_flows_evicted_total {evicted}");
    family(
        &mut out,
        "trireme_flows_expired_total",
        "counter",
        "Flow-table entries whose handshake timed out.",
    );
    let _ = writeln!(out, "trireme_flows_expired_total {expired}");

    let drops = e.drops.snapshot();
    family(
        &mut out,
        "trireme_drops_total",
        "counter",
        "Packets dropped by the enforcer, by reason (docs/enforcer.md).",
    );
    for (reason, n) in &drops {
        let _ = writeln!(out, "trireme_drops_total{{reason=\"{}\"}} {n}", esc(reason));
    }

    let counters = e.counters.snapshot();
    family(
        &mut out,
        "trireme_handled_packets_total",
        "counter",
        "TCP packets that reached the enforcer, by hook and kind.",
    );
    for (name, n) in &counters {
        if let Some(kind) = name
            .strip_prefix("handled_")
            .filter(|k| !k.ends_with("_ns"))
        {
            let _ = writeln!(
                out,
                "trireme_handled_packets_total{{packet=\"{kind}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "trireme_handling_seconds_total",
        "counter",
        "Time the enforcer spent deciding them, crypto included.",
    );
    for (name, n) in &counters {
        let kind = name
            .strip_prefix("handled_")
            .and_then(|k| k.strip_suffix("_ns"));
        if let Some(kind) = kind {
            let s = *n as f64 / 1e9;
            let _ = writeln!(
                out,
                "trireme_handling_seconds_total{{packet=\"{kind}\"}} {s}"
            );
        }
    }

    family(
        &mut out,
        "trireme_events_total",
        "counter",
        "Everything else the enforcer counts (authorized, syn_sent, held, policy_updates, ...).",
    );
    for (name, n) in &counters {
        if reported_elsewhere(name) || drops.contains_key(name) {
            continue;
        }
        let _ = writeln!(out, "trireme_events_total{{event=\"{}\"}} {n}", esc(name));
    }

    family(
        &mut out,
        "trireme_handshake_seconds",
        "histogram",
        "Handshakes between nodes: initiator, SYN out to SYN-ACK in; responder, SYN in to ACK verified.",
    );
    e.handshake_initiator
        .render(&mut out, "trireme_handshake_seconds", "side=\"initiator\"");
    e.handshake_responder
        .render(&mut out, "trireme_handshake_seconds", "side=\"responder\"");

    let per_pu = [
        (
            "trireme_queue_waiting_packets",
            "gauge",
            "Packets in a PU's NFQUEUEs waiting for a verdict (kernel figure).",
        ),
        (
            "trireme_queue_full_drops_total",
            "counter",
            "Packets the kernel dropped because a PU's queue was full (fail-closed).",
        ),
        (
            "trireme_queue_socket_drops_total",
            "counter",
            "Packets the kernel dropped because the enforcer's socket buffer was full.",
        ),
    ];
    for (i, (name, kind, help)) in per_pu.iter().enumerate() {
        family(&mut out, name, kind, help);
        for (pu, s) in kernel {
            if let Ok(KernelStats { queues: s, .. }) = s {
                let v = [s.waiting, s.queue_dropped, s.user_dropped][i];
                let _ = writeln!(out, "{name}{{pu=\"{}\"}} {v}", esc(pu));
            }
        }
    }
    let name = "trireme_kernel_flows_total";
    family(
        &mut out,
        name,
        "counter",
        "First packets of flows our nftables table decided by the peer's address (datagrams, \
         and inbound TCP SYNs without a token): allowed there, or denied and dropped there \
         beyond the rate of denials passed on to userspace (those are in trireme_drops_total).",
    );
    for (pu, s) in kernel {
        if let Ok(KernelStats { by_address: c, .. }) = s {
            for (direction, verdict, v) in [
                ("ingress", "allowed", c.in_allowed),
                ("ingress", "dropped", c.in_dropped),
                ("egress", "allowed", c.out_allowed),
                ("egress", "dropped", c.out_dropped),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{pu=\"{}\",direction=\"{direction}\",verdict=\"{verdict}\"}} {v}",
                    esc(pu)
                );
            }
        }
    }
    family(
        &mut out,
        "trireme_kernel_scrape_errors",
        "gauge",
        "PUs whose kernel figures could not be read in this scrape.",
    );
    let errors = kernel.iter().filter(|(_, s)| s.is_err()).count();
    let _ = writeln!(out, "trireme_kernel_scrape_errors {errors}");

    let plugins = policy.plugin_stats();
    if !plugins.is_empty() {
        family(
            &mut out,
            "trireme_plugin_calls_total",
            "counter",
            "Plugin calls that entered the guest.",
        );
        for (name, st) in &plugins {
            let _ = writeln!(
                out,
                "trireme_plugin_calls_total{{plugin=\"{}\"}} {}",
                esc(name),
                st.calls
            );
        }
        family(
            &mut out,
            "trireme_plugin_memo_hits_total",
            "counter",
            "Plugin calls answered from the memo.",
        );
        for (name, st) in &plugins {
            let _ = writeln!(
                out,
                "trireme_plugin_memo_hits_total{{plugin=\"{}\"}} {}",
                esc(name),
                st.memo_hits
            );
        }
        family(
            &mut out,
            "trireme_plugin_failures_total",
            "counter",
            "Plugin calls that failed (fail-closed), by kind.",
        );
        for (name, st) in &plugins {
            for (kind, n) in &st.failures {
                let _ = writeln!(
                    out,
                    "trireme_plugin_failures_total{{plugin=\"{}\",kind=\"{}\"}} {n}",
                    esc(name),
                    esc(kind)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_le_bounds() {
        let h = Histogram::default();
        for us in [10, 50, 51, 2_000, 5_000_000] {
            h.observe_us(us);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "side=\"a\"");
        assert!(
            out.contains("x_bucket{side=\"a\",le=\"0.00005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{side=\"a\",le=\"0.0001\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{side=\"a\",le=\"0.0025\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{side=\"a\",le=\"1\"} 4\n"), "{out}");
        assert!(
            out.contains("x_bucket{side=\"a\",le=\"+Inf\"} 5\n"),
            "{out}"
        );
        assert!(out.contains("x_count{side=\"a\"} 5\n"), "{out}");
        assert!(out.contains("x_sum{side=\"a\"} 5.002111\n"), "{out}");
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn queue_table_is_summed_and_odd_lines_skipped() {
        let t = "    0  1234     3 2 65531     7     1      99  1\n\
                     1  1235     0 2 65531     2     4     100  1\n\
                 garbage line\n\
                     2\n";
        assert_eq!(
            parse_queue_stats(t),
            QueueStats {
                queues: 2,
                waiting: 3,
                queue_dropped: 9,
                user_dropped: 5
            }
        );
        assert_eq!(parse_queue_stats(""), QueueStats::default());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
