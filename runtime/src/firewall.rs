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

fn nsenter(netns: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display()));
    c
}

fn run(mut c: Command, stdin: Option<&str>) -> Result<String, String> {
    let desc = format!("{c:?}");
    c.stdin(if stdin.is_some() {
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

/// Install (or atomically replace) our chains in the namespace at `netns`.
pub fn apply(netns: &Path, o: &Options) -> Result<(), String> {
    // Conntrack in the PU namespace sees the token bytes as sequence space
    // on SYN and SYN-ACK before we strip them; liberal window tracking keeps
    // it from marking the next segments invalid (as Trireme did).
    let mut c = nsenter(netns);
    c.args([
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal",
    ]);
    run(c, None)?;
    for (v6, tool) in [(false, "iptables"), (true, "ip6tables")] {
        let mut c = nsenter(netns);
        c.args([&format!("{tool}-restore"), "--noflush", "--wait"]);
        run(c, Some(&render(v6, o)))?;
        for (hook, chain) in [("INPUT", CHAIN_IN), ("OUTPUT", CHAIN_OUT)] {
            let mut check = nsenter(netns);
            check.args([tool, "-w", "-C", hook, "-j", chain]);
            if run(check, None).is_err() {
                let mut ins = nsenter(netns);
                ins.args([tool, "-w", "-I", hook, "1", "-j", chain]);
                run(ins, None)?;
            }
        }
    }
    Ok(())
}

/// The PU's global addresses (what its peers see as its source).
pub fn addresses(netns: &Path) -> Result<Vec<std::net::IpAddr>, String> {
    let mut c = nsenter(netns);
    c.args(["ip", "-j", "address", "show"]);
    let out = run(c, None)?;
    parse_addresses(&out)
}

fn parse_addresses(json: &str) -> Result<Vec<std::net::IpAddr>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("`ip -j address`: {e}"))?;
    let mut ips = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "global"
                && let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok())
            {
                ips.push(ip);
            }
        }
    }
    Ok(ips)
}

/// Remove everything `apply` added (the PU is gone or no longer ours).
pub fn remove(netns: &Path) -> Result<(), String> {
    let mut errors = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        for (hook, chain) in [("INPUT", CHAIN_IN), ("OUTPUT", CHAIN_OUT)] {
            loop {
                let mut c = nsenter(netns);
                c.args([tool, "-w", "-D", hook, "-j", chain]);
                if run(c, None).is_err() {
                    break;
                }
            }
            for op in ["-F", "-X"] {
                let mut c = nsenter(netns);
                c.args([tool, "-w", op, chain]);
                if let Err(e) = run(c, None)
                    && !e.contains("No chain")
                    && !e.contains("does not exist")
                {
                    errors.push(e);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_addresses_only() {
        let json = r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","scope":"host"}]},
            {"ifname":"eth0","addr_info":[{"family":"inet","local":"198.18.1.10","scope":"global"},
            {"family":"inet6","local":"fd00::1:10","scope":"global"},
            {"family":"inet6","local":"fe80::1","scope":"link"}]}]"#;
        let ips = parse_addresses(json).unwrap();
        assert_eq!(
            ips,
            vec![
                "198.18.1.10".parse::<std::net::IpAddr>().unwrap(),
                "fd00::1:10".parse().unwrap()
            ]
        );
        assert!(parse_addresses("not json").is_err());
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
