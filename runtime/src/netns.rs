//! Work inside a PU's network namespace without spawning `nsenter` or `ip`.
//!
//! Programming a PU used to spawn a dozen processes (`nsenter` → `sh`,
//! `iptables -C`, `-D`, `-F`, `-X`, `ip -j address`), each a fork and two
//! execs, and each iptables-nft call a full fetch of the kernel's rules:
//! about 30 ms to add a PU and 220 ms to remove one on the CI machine, and
//! 100 PUs took 6 s to start. A thread that has entered the namespace
//! reads addresses over rtnetlink and writes sysctls itself, and the
//! processes it does spawn (`iptables-save`, `iptables-restore`) inherit
//! its namespace from the fork, so no `nsenter` is needed.

use nix::libc;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Run `f` on a new thread that has entered the network namespace at
/// `path` (namespaces are per thread: the caller's stays as it was).
/// Errors name the namespace.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let ns = std::fs::File::open(&p).map_err(|e| e.to_string())?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            f()
        })
        .map_err(|e| format!("thread: {e}"))
        .and_then(|t| t.join().map_err(|_| "the namespace thread panicked".into()))
        .and_then(|r| r)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Write a sysctl of the current thread's network namespace (a thread in
/// `run_in`): `/proc/sys/net` resolves against the opening thread's
/// namespace, whatever namespace `/proc` was mounted from.
pub fn write_sysctl(key: &str, value: &str) -> Result<(), String> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&p, value).map_err(|e| format!("{p}: {e}"))
}

/// The addresses of global scope in the current thread's network
/// namespace (what `ip address` shows as `scope global`: not loopback,
/// not link-local), read with one rtnetlink dump.
pub fn global_addresses() -> Result<Vec<std::net::IpAddr>, String> {
    let err = |what: &str| format!("rtnetlink {what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain socket calls on a descriptor we own and close below;
    // every buffer passed is valid for the length given.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(err("socket"));
        }
        // Closed when dropped, on every return below.
        let fd: OwnedFd = FromRawFd::from_raw_fd(fd);
        let raw = fd.as_raw_fd();
        let req = dump_request();
        if libc::send(raw, req.as_ptr().cast(), req.len(), 0) != req.len() as isize {
            return Err(err("send"));
        }
        // The kernel fills a dump's datagrams up to 32 KiB: never truncated.
        let mut buf = vec![0u8; 64 * 1024];
        let mut ips = Vec::new();
        loop {
            let n = libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err("recv"));
            }
            if parse_dump(&buf[..n as usize], &mut ips)? {
                return Ok(ips);
            }
        }
    }
}

const NLMSG_HDR: usize = 16;
const IFADDRMSG: usize = 8;
const SEQ: u32 = 1;

/// RTM_GETADDR, every family, as a dump.
fn dump_request() -> [u8; NLMSG_HDR + IFADDRMSG] {
    let mut m = [0u8; NLMSG_HDR + IFADDRMSG];
    m[0..4].copy_from_slice(&((NLMSG_HDR + IFADDRMSG) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&libc::RTM_GETADDR.to_ne_bytes());
    m[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&SEQ.to_ne_bytes());
    m
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Parse one datagram of the dump's answer into `ips`; true once the dump
/// is complete. Lengths are checked before every read: a kernel answer is
/// trusted no more than a packet.
fn parse_dump(mut b: &[u8], ips: &mut Vec<std::net::IpAddr>) -> Result<bool, String> {
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDR || len > b.len() {
            return Err(format!("rtnetlink: message of {len} bytes in {}", b.len()));
        }
        let (msg, rest) = b.split_at(len);
        b = rest.get(align4(len) - len..).unwrap_or(&[]);
        match u16_at(msg, 4) as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let code = if msg.len() >= NLMSG_HDR + 4 {
                    -(u32_at(msg, NLMSG_HDR) as i32)
                } else {
                    0
                };
                return Err(format!(
                    "rtnetlink: {}",
                    std::io::Error::from_raw_os_error(code)
                ));
            }
            t if t == libc::RTM_NEWADDR as i32 => {
                if let Some(ip) = address(&msg[NLMSG_HDR..]) {
                    ips.push(ip);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// An ifaddrmsg and its attributes: the address if its scope is global.
/// `IFA_LOCAL` is the interface's own address where both are given (on a
/// point-to-point link `IFA_ADDRESS` is the peer's), as `ip` shows it.
fn address(m: &[u8]) -> Option<std::net::IpAddr> {
    if m.len() < IFADDRMSG || m[3] != libc::RT_SCOPE_UNIVERSE {
        return None;
    }
    let family = m[0] as i32;
    let (mut local, mut addr) = (None, None);
    let mut a = &m[IFADDRMSG..];
    while a.len() >= 4 {
        let len = u16_at(a, 0) as usize;
        if len < 4 || len > a.len() {
            break;
        }
        let v = &a[4..len];
        let ip = match (family, v.len()) {
            (libc::AF_INET, 4) => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
            (libc::AF_INET6, 16) => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
            _ => None,
        };
        match u16_at(a, 2) {
            libc::IFA_LOCAL => local = ip,
            libc::IFA_ADDRESS => addr = ip,
            _ => {}
        }
        a = a.get(align4(len)..).unwrap_or(&[]);
    }
    local.or(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(((4 + v.len()) as u16).to_ne_bytes());
        a.extend(kind.to_ne_bytes());
        a.extend(v);
        a.resize(align4(a.len()), 0);
        a
    }

    fn newaddr(family: u8, scope: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![family, 24, 0, scope, 2, 0, 0, 0];
        for a in attrs {
            body.extend(a);
        }
        let mut m = Vec::new();
        m.extend(((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend(libc::RTM_NEWADDR.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(body);
        m
    }

    fn done() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend((NLMSG_HDR as u32 + 4).to_ne_bytes());
        m.extend((libc::NLMSG_DONE as u16).to_ne_bytes());
        m.extend([0u8; 14]);
        m
    }

    #[test]
    fn global_scope_only_and_the_local_address_first() {
        let mut d = newaddr(
            libc::AF_INET as u8,
            254,
            &[attr(libc::IFA_LOCAL, &[127, 0, 0, 1])],
        );
        // Point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours.
        d.extend(newaddr(
            libc::AF_INET as u8,
            0,
            &[
                attr(libc::IFA_ADDRESS, &[198, 18, 0, 9]),
                attr(libc::IFA_LOCAL, &[198, 18, 0, 1]),
            ],
        ));
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        v6[15] = 1;
        d.extend(newaddr(
            libc::AF_INET6 as u8,
            0,
            &[attr(libc::IFA_ADDRESS, &v6)],
        ));
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        d.extend(newaddr(
            libc::AF_INET6 as u8,
            253,
            &[attr(libc::IFA_ADDRESS, &ll)],
        ));
        let mut ips = Vec::new();
        assert!(!parse_dump(&d, &mut ips).unwrap());
        assert!(parse_dump(&done(), &mut ips).unwrap());
        assert_eq!(
            ips,
            vec![
                "198.18.0.1".parse::<std::net::IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn truncated_answers_are_errors_or_ignored_never_panics() {
        let d = newaddr(
            libc::AF_INET as u8,
            0,
            &[attr(libc::IFA_LOCAL, &[198, 18, 0, 1])],
        );
        for n in 0..d.len() {
            let mut ips = Vec::new();
            let _ = parse_dump(&d[..n], &mut ips);
        }
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&9u32.to_ne_bytes());
        assert!(parse_dump(&bad, &mut Vec::new()).is_err());
        // A wrong attribute length ends the attributes, nothing more.
        let mut odd = d.clone();
        odd[NLMSG_HDR + IFADDRMSG..NLMSG_HDR + IFADDRMSG + 2]
            .copy_from_slice(&200u16.to_ne_bytes());
        let mut ips = Vec::new();
        assert!(!parse_dump(&odd, &mut ips).unwrap());
        assert!(ips.is_empty());
    }
}
