//! Programming a PU's namespace: our own chains, applied atomically.
//!
//! Design choice, forced by kernels like this project's CI machine: the
//! nftables `queue` expression (CONFIG_NFT_QUEUE) is often missing while
//! the xtables NFQUEUE target is built in. So the rules are written for
//! `iptables-restore`/`ip6tables-restore` of the iptables-nft flavour:
//! they land in the kernel's nf_tables as one transaction per family,
//! through the xt compatibility layer where needed. (See docs/enforcer.md.)
//!
//! Per family, in the PU's namespace, chains `TRIREME-IN` (hooked first
//! in INPUT) and `TRIREME-OUT` (first in OUTPUT):
//! 0. a SYN (without ACK) clears both conntrack mark bits: a new
//!    connection never inherits a mark from an older one on its tuple;
//! 1. flows with the conntrack mark bit pass: the kernel carries them
//!    (inbound, only segments without our marker option: a token that
//!    arrives on a marked flow goes to NFQUEUE, after rules 2 and 3, to be
//!    stripped or refused, never delivered as payload; and a SYN-ACK only
//!    if the mark is not provisional: see 4);
//! 2. packets we authorized (nfmark bit, re-injected by NF_REPEAT) set
//!    the conntrack mark bit and pass; the initiator's token ACK sets the
//!    provisional bit too;
//! 3. inbound, a SYN-ACK we revoked (nfmark bit) clears both bits and passes;
//! 4. inbound, a SYN-ACK on a provisionally marked flow goes to NFQUEUE
//!    (it means our token ACK was lost); other packets of such a flow pass;
//! 5. loopback, TCP RSTs and ICMP pass (ICMPv6 carries neighbour discovery);
//! 6. all other TCP, and new flows of other protocols, go to NFQUEUE,
//!    with no bypass: if no enforcer listens they are dropped (fail-closed);
//! 7. everything else (replies to flows we did not authorize) is dropped.
//!
//! Rules 2 and 3 come before 4 because NF_REPEAT runs the chain again.

use crate::netns;
use crate::packet::OPTION_KIND;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// nfmark bit meaning "authorized by the enforcer" (on re-injection).
pub const AUTH_MARK: u32 = 0x2000_0000;
/// conntrack mark bit meaning "this flow is authorized".
pub const CT_MARK: u32 = 0x2000_0000;
/// nfmark bit on the initiator's token ACK: authorize provisionally.
pub const PROVISIONAL_MARK: u32 = 0x1000_0000;
/// conntrack mark bit meaning "authorized by our token ACK, which may have
/// been lost": SYN-ACKs of the flow still go to the queue.
pub const CT_PROVISIONAL: u32 = 0x1000_0000;
/// nfmark bit on a re-sent SYN-ACK at the initiator: clear both bits.
pub const REVOKE_MARK: u32 = 0x0800_0000;
pub const CHAIN_IN: &str = "TRIREME-IN";
pub const CHAIN_OUT: &str = "TRIREME-OUT";

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// First NFQUEUE number; `queues` consecutive numbers are used.
    pub queue: u16,
    pub queues: u16,
    /// Pick the queue by the CPU that handles the packet, not by flow hash.
    pub cpu_fanout: bool,
    /// NFQUEUE bypass: accept when nobody listens. Unsafe, explicit.
    pub fail_open: bool,
}

/// The `iptables-restore --noflush` input for one family.
pub fn render(v6: bool, o: &Options) -> String {
    let mut s = String::from("*filter\n");
    s += &format!(":{CHAIN_IN} - [0:0]\n:{CHAIN_OUT} - [0:0]\n");
    let queue = if o.queues > 1 {
        format!(
            "NFQUEUE --queue-balance {}:{}{}",
            o.queue,
            o.queue + o.queues - 1,
            if o.cpu_fanout {
                " --queue-cpu-fanout"
            } else {
                ""
            }
        )
    } else {
        format!("NFQUEUE --queue-num {}", o.queue)
    };
    let bypass = if o.fail_open { " --queue-bypass" } else { "" };
    let icmp = if v6 { "ipv6-icmp" } else { "icmp" };
    let both = CT_MARK | CT_PROVISIONAL;
    for (chain, lo) in [(CHAIN_IN, "-i lo"), (CHAIN_OUT, "-o lo")] {
        let r = |s: &mut String, rule: &str| *s += &format!("-A {chain} {rule}\n");
        let inbound = chain == CHAIN_IN;
        // A SYN opens a new connection, whatever conntrack remembers of the
        // tuple: an entry the kernel does not reset on a SYN (closed by a
        // reset from the other side, or left while nothing tracked) would
        // otherwise lend its mark to the new connection, and the SYN would
        // pass with no token and no decision.
        r(
            &mut s,
            &format!("-p tcp -m tcp --tcp-flags SYN,ACK SYN -j CONNMARK --set-xmark 0x0/{both:#x}"),
        );
        // Authorized flows first: almost every packet stops at this rule.
        // Inbound, a segment carrying our marker option never takes it: a
        // token that arrives after the mark (the initiator's data that
        // took the token on another queue, an ACK re-sent after a lost
        // one) would reach the application as payload.
        // Inbound, a segment without SYN passes on any authorized flow,
        // provisional or not: the initiator's flows stay provisional for
        // their whole life, and their data took nine rules before this one
        // existed. Only a SYN-ACK must reach the queue on those (rule 4).
        let fast = format!("-m connmark --mark {CT_MARK:#x}/{CT_MARK:#x} -j ACCEPT");
        if inbound {
            r(
                &mut s,
                &format!("-p tcp -m tcp --tcp-flags SYN NONE ! --tcp-option {OPTION_KIND} {fast}"),
            );
            r(
                &mut s,
                &format!(
                    "-p tcp -m tcp ! --tcp-option {OPTION_KIND} -m connmark --mark {CT_MARK:#x}/{both:#x} -j ACCEPT"
                ),
            );
            r(&mut s, &format!("! -p tcp {fast}"));
        } else {
            r(&mut s, &fast);
        }
        r(
            &mut s,
            &format!(
                "-m mark --mark {AUTH_MARK:#x}/{AUTH_MARK:#x} -j CONNMARK --set-xmark {CT_MARK:#x}/{CT_MARK:#x}"
            ),
        );
        if !inbound {
            r(
                &mut s,
                &format!(
                    "-m mark --mark {PROVISIONAL_MARK:#x}/{PROVISIONAL_MARK:#x} -j CONNMARK --set-xmark {both:#x}/{both:#x}"
                ),
            );
        }
        r(
            &mut s,
            &format!("-m mark --mark {AUTH_MARK:#x}/{AUTH_MARK:#x} -j ACCEPT"),
        );
        if inbound {
            r(
                &mut s,
                &format!(
                    "-m mark --mark {REVOKE_MARK:#x}/{REVOKE_MARK:#x} -j CONNMARK --set-xmark 0x0/{both:#x}"
                ),
            );
            r(
                &mut s,
                &format!("-m mark --mark {REVOKE_MARK:#x}/{REVOKE_MARK:#x} -j ACCEPT"),
            );
            r(
                &mut s,
                &format!("-p tcp -m tcp --tcp-option {OPTION_KIND} -j {queue}{bypass}"),
            );
            r(
                &mut s,
                &format!("-p tcp --tcp-flags SYN,ACK SYN,ACK -j {queue}{bypass}"),
            );
            r(
                &mut s,
                &format!("-m connmark --mark {CT_MARK:#x}/{CT_MARK:#x} -j ACCEPT"),
            );
        }
        r(&mut s, &format!("{lo} -j ACCEPT"));
        r(&mut s, "-p tcp --tcp-flags RST RST -j ACCEPT");
        r(&mut s, &format!("-p {icmp} -j ACCEPT"));
        r(&mut s, &format!("-p tcp -j {queue}{bypass}"));
        r(
            &mut s,
            &format!("-m conntrack --ctstate NEW -j {queue}{bypass}"),
        );
        r(&mut s, "-j DROP");
    }
    s += "COMMIT\n";
    s
}

/// Run `program` (in the calling thread's namespace: the fork inherits
/// it), feeding it `stdin`; its stdout, or its stderr as the error.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let desc = format!("{program} {}", args.join(" "));
    let mut c = Command::new(program);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("{desc}: {e}"))?;
    if let Some(input) = stdin {
        let mut w = child.stdin.take().ok_or("no stdin")?;
        w.write_all(input.as_bytes())
            .map_err(|e| format!("{desc}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{desc}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{desc}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What of ours a family's filter table holds, from `iptables-save`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Ours {
    /// Our chains that exist.
    chains: Vec<&'static str>,
    /// The jumps to them from INPUT and OUTPUT, one entry per rule.
    jumps: Vec<(&'static str, &'static str)>,
}

const HOOKS: [(&str, &str); 2] = [("INPUT", CHAIN_IN), ("OUTPUT", CHAIN_OUT)];

impl Ours {
    fn parse(save: &str) -> Ours {
        let mut o = Ours::default();
        for line in save.lines().map(str::trim_end) {
            for (hook, chain) in HOOKS {
                if line.strip_prefix(':').and_then(|l| l.split(' ').next()) == Some(chain) {
                    o.chains.push(chain);
                }
                if line == format!("-A {hook} -j {chain}") {
                    o.jumps.push((hook, chain));
                }
            }
        }
        o
    }

    fn read(tool: &str) -> Result<Ours, String> {
        Ok(Ours::parse(&run(
            &format!("{tool}-save"),
            &["-t", "filter"],
            None,
        )?))
    }
}

/// The `iptables-restore --noflush` input that installs or replaces our
/// chains and adds the jumps to them that `ours` lacks: chains and jumps
/// in one transaction.
fn apply_text(v6: bool, o: &Options, ours: &Ours) -> String {
    let mut s = render(v6, o);
    s.truncate(s.len() - "COMMIT\n".len());
    for (hook, chain) in HOOKS {
        if !ours.jumps.contains(&(hook, chain)) {
            s += &format!("-I {hook} 1 -j {chain}\n");
        }
    }
    s + "COMMIT\n"
}

/// The input that removes every jump to our chains, then the chains;
/// `None` when there is nothing of ours.
fn remove_text(ours: &Ours) -> Option<String> {
    if ours.chains.is_empty() && ours.jumps.is_empty() {
        return None;
    }
    let mut s = String::from("*filter\n");
    for (hook, chain) in &ours.jumps {
        s += &format!("-D {hook} -j {chain}\n");
    }
    for chain in &ours.chains {
        s += &format!("-F {chain}\n-X {chain}\n");
    }
    Some(s + "COMMIT\n")
}

const BE_LIBERAL: &str = "net/netfilter/nf_conntrack_tcp_be_liberal";

/// Install (or atomically replace) our chains in the namespace at `netns`:
/// per family, one `iptables-save` to see what is there and one
/// `iptables-restore` transaction, run from a thread inside the namespace.
pub fn apply(netns: &Path, o: &Options) -> Result<(), String> {
    let o = *o;
    netns::run_in(netns, move || {
        // Conntrack in the PU namespace sees the token bytes as sequence
        // space on SYN and SYN-ACK before we strip them; liberal window
        // tracking keeps it from marking the next segments invalid (as
        // Trireme did). Set before the rules where conntrack is loaded
        // already; else the rules load it, and it is set right after.
        let early = netns::write_sysctl(BE_LIBERAL, "1").is_ok();
        for (v6, tool) in [(false, "iptables"), (true, "ip6tables")] {
            let text = apply_text(v6, &o, &Ours::read(tool)?);
            run(
                &format!("{tool}-restore"),
                &["--noflush", "--wait"],
                Some(&text),
            )?;
        }
        if !early {
            netns::write_sysctl(BE_LIBERAL, "1")?;
        }
        Ok(())
    })
}

/// The PU's global addresses (what its peers see as its source).
pub fn addresses(netns: &Path) -> Result<Vec<std::net::IpAddr>, String> {
    netns::run_in(netns, netns::global_addresses)
}

/// Remove everything `apply` added (the PU is gone or no longer ours):
/// per family, one transaction, and none where nothing of ours is left.
pub fn remove(netns: &Path) -> Result<(), String> {
    netns::run_in(netns, || {
        for tool in ["iptables", "ip6tables"] {
            if let Some(text) = remove_text(&Ours::read(tool)?) {
                run(
                    &format!("{tool}-restore"),
                    &["--noflush", "--wait"],
                    Some(&text),
                )?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_missing_jumps_are_added_and_every_jump_is_removed() {
        let save = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            :TRIREME-IN - [0:0]\n:TRIREME-OUT - [0:0]\n:TRIREME-INX - [0:0]\n\
            -A INPUT -j TRIREME-IN\n-A INPUT -s 198.18.0.1/32 -j TRIREME-IN\n-A INPUT -j TRIREME-IN\n\
            -A TRIREME-IN -j ACCEPT\nCOMMIT\n";
        let ours = Ours::parse(save);
        assert_eq!(ours.chains, vec![CHAIN_IN, CHAIN_OUT]);
        assert_eq!(ours.jumps, vec![("INPUT", CHAIN_IN), ("INPUT", CHAIN_IN)]);
        let o = Options {
            queue: 0,
            queues: 1,
            cpu_fanout: false,
            fail_open: false,
        };
        let t = apply_text(false, &o, &ours);
        assert!(!t.contains("-I INPUT"));
        assert!(t.ends_with("-I OUTPUT 1 -j TRIREME-OUT\nCOMMIT\n"), "{t}");
        assert_eq!(t.matches("COMMIT").count(), 1);
        let fresh = apply_text(false, &o, &Ours::parse(""));
        assert!(fresh.contains("-I INPUT 1 -j TRIREME-IN\n-I OUTPUT 1 -j TRIREME-OUT\nCOMMIT\n"));
        assert_eq!(
            remove_text(&ours).unwrap(),
            "*filter\n-D INPUT -j TRIREME-IN\n-D INPUT -j TRIREME-IN\n\
             -F TRIREME-IN\n-X TRIREME-IN\n-F TRIREME-OUT\n-X TRIREME-OUT\nCOMMIT\n"
        );
        assert_eq!(
            remove_text(&Ours::parse("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")),
            None
        );
    }

    #[test]
    fn fail_closed_by_default() {
        let o = Options {
            queue: 0,
            queues: 1,
            cpu_fanout: false,
            fail_open: false,
        };
        let r = render(false, &o);
        assert!(!r.contains("bypass"));
        assert!(r.contains("-A TRIREME-IN -p tcp -j NFQUEUE --queue-num 0\n"));
        assert!(r.trim_end().ends_with("COMMIT"));
        assert!(r.contains("-A TRIREME-OUT -j DROP"));
        // Inbound, segments without SYN take the fast path on every marked
        // flow; a SYN-ACK only on flows not provisionally marked, so that a
        // re-sent SYN-ACK reaches the queue. The revoke rules come before
        // the queue, since NF_REPEAT runs the chain again.
        let lines: Vec<&str> = r.lines().collect();
        let at = |rule: &str| {
            lines
                .iter()
                .position(|l| *l == rule)
                .unwrap_or_else(|| panic!("missing {rule}\n{r}"))
        };
        assert_eq!(
            at(
                "-A TRIREME-IN -p tcp -m tcp --tcp-flags SYN NONE ! --tcp-option 253 -m connmark --mark 0x20000000/0x20000000 -j ACCEPT"
            ),
            4
        );
        assert_eq!(
            at(
                "-A TRIREME-IN -p tcp -m tcp ! --tcp-option 253 -m connmark --mark 0x20000000/0x30000000 -j ACCEPT"
            ),
            5
        );
        assert_eq!(
            at("-A TRIREME-IN ! -p tcp -m connmark --mark 0x20000000/0x20000000 -j ACCEPT"),
            6
        );
        // A SYN forgets any mark its tuple had, before any fast path.
        for c in ["IN", "OUT"] {
            assert!(
                at(&format!(
                    "-A TRIREME-{c} -p tcp -m tcp --tcp-flags SYN,ACK SYN -j CONNMARK --set-xmark 0x0/0x30000000"
                )) < at(&format!(
                    "-A TRIREME-{c} -m connmark --mark 0x20000000/0x20000000 -j ACCEPT"
                ))
            );
        }
        let revoke = at("-A TRIREME-IN -m mark --mark 0x8000000/0x8000000 -j ACCEPT");
        // A token on a marked flow still reaches the queue (to be stripped
        // or refused), after the re-injection rules.
        let token = at("-A TRIREME-IN -p tcp -m tcp --tcp-option 253 -j NFQUEUE --queue-num 0");
        let synack =
            at("-A TRIREME-IN -p tcp --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-num 0");
        let provisional = at("-A TRIREME-IN -m connmark --mark 0x20000000/0x20000000 -j ACCEPT");
        assert!(revoke < token && token < synack && synack < provisional);
        at("-A TRIREME-OUT -m connmark --mark 0x20000000/0x20000000 -j ACCEPT");
        at(
            "-A TRIREME-OUT -m mark --mark 0x10000000/0x10000000 -j CONNMARK --set-xmark 0x30000000/0x30000000",
        );
        assert!(!r.contains("-A TRIREME-OUT -m mark --mark 0x8000000"));
        let r6 = render(
            true,
            &Options {
                queues: 4,
                fail_open: true,
                ..o
            },
        );
        assert!(r6.contains("--queue-balance 0:3 --queue-bypass"));
        let cpu = render(
            false,
            &Options {
                queues: 2,
                cpu_fanout: true,
                ..o
            },
        );
        assert!(cpu.contains("-p tcp -j NFQUEUE --queue-balance 0:1 --queue-cpu-fanout\n"));
        assert!(r6.contains("ipv6-icmp"));
    }
}
