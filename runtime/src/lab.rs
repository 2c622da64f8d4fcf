//! A lab of real network namespaces for the demo, the end-to-end tests and
//! the benchmarks: a bridge
//! namespace, hosts behind veth pairs (198.18.0.0/15 and fd00::/8), TCP
//! servers and clients run on threads that entered a host's namespace, and
//! `trireme-runtime` processes. Everything is removed when the lab drops,
//! on success and on panic; the root namespace is never touched.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static LABS: AtomicUsize = AtomicUsize::new(0);

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

impl Host {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns))
    }
}

pub struct Runtime {
    pub name: String,
    pub config: PathBuf,
    pub stats: PathBuf,
    child: Option<Child>,
}

impl Runtime {
    /// The running process id (0 if stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }
}

pub struct Lab {
    pub id: String,
    /// The `trireme-runtime` binary to start.
    bin: PathBuf,
    pub dir: PathBuf,
    br: String,
    hosts: Vec<String>,
    pub runtimes: Vec<Runtime>,
}

/// Run `f` on a thread inside the network namespace at `path` (tests and
/// benches: a namespace that cannot be entered is a broken lab, so panic).
pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    crate::netns::run_in(path, move || Ok(f())).unwrap()
}

impl Lab {
    pub fn new(tag: &str, bin: impl Into<PathBuf>) -> Lab {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let id = format!("tr{}{tag}{n}", std::process::id() % 100000);
        let dir = std::env::temp_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let br = format!("{id}-br");
        sh(&["ip", "netns", "add", &br]);
        let lab = Lab {
            id,
            bin: bin.into(),
            dir,
            br: br.clone(),
            hosts: vec![],
            runtimes: vec![],
        };
        sh(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        lab
    }

    /// A host namespace on the lab bridge with these addresses (v4 /16, v6 /64).
    pub fn host(&mut self, name: &str, ip4: &str, ip6: &str) -> Host {
        let ns = format!("{}-{name}", self.id);
        let i = self.hosts.len();
        sh(&["ip", "netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let peer = format!("p{i}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
            "netns", &self.br,
        ]);
        sh(&[
            "ip", "-n", &self.br, "link", "set", &peer, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip4}/16"),
            "dev",
            "eth0",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        Host {
            ns,
            ip4: ip4.parse().unwrap(),
            ip6: ip6.parse().unwrap(),
        }
    }

    /// Delete this namespace with the lab.
    pub fn adopt(&mut self, ns: &str) {
        self.hosts.push(ns.to_string());
    }

    pub fn bridge_ns(&self) -> &str {
        &self.br
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Compile NetworkPolicy YAML into `name` (a ruleset file).
    pub fn compile(&self, name: &str, policies: &str) -> PathBuf {
        let src = self.write(&format!("{name}.yaml"), policies);
        let loaded = trireme_compiler::source::load(&[src])
            .unwrap_or_else(|d| panic!("policies do not compile: {d:?}"));
        let rs = trireme_compiler::compile::compile(&loaded);
        let out = self.dir.join(name);
        std::fs::write(&out, rs.encode()).unwrap();
        out
    }

    /// Start a runtime with this config (YAML; `stats` is added).
    pub fn start(&mut self, name: &str, config: &str) -> usize {
        let stats = self.dir.join(format!("{name}.stats.json"));
        let cfg = format!("{config}\nstats: {}\n", stats.display());
        let path = self.write(&format!("{name}.yaml"), &cfg);
        self.runtimes.push(Runtime {
            name: name.into(),
            config: path,
            stats,
            child: None,
        });
        let i = self.runtimes.len() - 1;
        self.restart(i);
        i
    }

    pub fn restart(&mut self, i: usize) {
        let bin = self.bin.clone();
        let r = &mut self.runtimes[i];
        let _ = std::fs::remove_file(&r.stats);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", r.name))).unwrap();
        let child = Command::new(&bin)
            .args(["run", "-c"])
            .arg(&r.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        r.child = Some(child);
        let t0 = Instant::now();
        while !r.stats.exists() {
            if let Some(c) = r.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                let log =
                    std::fs::read_to_string(self.dir.join(format!("{}.log", r.name))).unwrap();
                panic!("runtime {} exited with {st}: {log}", r.name);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "runtime did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.runtimes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let c = self.runtimes[i].child.as_ref().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
    }

    /// Replace runtime `i`'s config and send it SIGHUP; returns the log
    /// line that answers (a reload done or refused).
    pub fn reconfigure(&self, i: usize, config: &str) -> String {
        let r = &self.runtimes[i];
        let answers = |log: &str| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains(": reloaded ") || l.contains(": reload refused"))
                .map(String::from)
                .collect()
        };
        let before = answers(&self.log(i)).len();
        let cfg = format!("{config}\nstats: {}\n", r.stats.display());
        std::fs::write(&r.config, cfg).unwrap();
        self.signal(i, nix::sys::signal::Signal::SIGHUP);
        let t0 = Instant::now();
        loop {
            if let Some(line) = answers(&self.log(i)).get(before) {
                return line.clone();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no answer to SIGHUP: {}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A counter from the runtime's stats file (0 if absent).
    pub fn counter(&self, i: usize, name: &str) -> u64 {
        // The file is rewritten every 500 ms.
        std::thread::sleep(Duration::from_millis(600));
        let text = std::fs::read_to_string(&self.runtimes[i].stats).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v.get(name).and_then(|x| x.as_u64()).unwrap_or(0)
    }

    pub fn stats(&self, i: usize) -> String {
        std::fs::read_to_string(&self.runtimes[i].stats).unwrap_or_default()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.runtimes[i].name)))
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.runtimes.len() {
            self.kill(i);
        }
        for ns in self.hosts.iter().chain(std::iter::once(&self.br)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Byte `i` of every server's stream: deterministic, so clients can hash it.
fn stream_byte(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

pub fn expected_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 65536];
    let mut i = 0;
    while i < n {
        let k = (n - i).min(buf.len() as u64) as usize;
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = stream_byte(i + j as u64);
        }
        h.update(&buf[..k]);
        i += k as u64;
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A TCP server in a host: a client sends a u64 N and gets N stream bytes,
/// as often as it likes on one connection.
pub struct Server {
    pub accepted: Arc<AtomicUsize>,
}

pub fn serve(host: &Host, ip: IpAddr, port: u16) -> Server {
    let addr = SocketAddr::new(ip, port);
    let l = in_netns(&host.path(), move || TcpListener::bind(addr).unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            acc.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    let mut n = [0u8; 8];
                    if s.read_exact(&mut n).is_err() {
                        return;
                    }
                    let n = u64::from_be_bytes(n);
                    let mut i = 0;
                    while i < n {
                        let k = (n - i).min(buf.len() as u64) as usize;
                        for (j, b) in buf[..k].iter_mut().enumerate() {
                            *b = stream_byte(i + j as u64);
                        }
                        if s.write_all(&buf[..k]).is_err() {
                            return;
                        }
                        i += k as u64;
                    }
                }
            });
        }
    });
    Server { accepted }
}

/// Connect from `from` and fetch `n` bytes; the sha256 of what arrived,
/// or None if the connection was refused or timed out.
pub fn fetch(from: &Host, to: SocketAddr, n: u64, timeout: Duration) -> Option<String> {
    in_netns(&from.path(), move || {
        let mut s = TcpStream::connect_timeout(&to, timeout).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        s.write_all(&n.to_be_bytes()).ok()?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut got = 0u64;
        while got < n {
            let want = (n - got).min(buf.len() as u64) as usize;
            match s.read(&mut buf[..want]) {
                Ok(0) | Err(_) => return None,
                Ok(k) => {
                    h.update(&buf[..k]);
                    got += k as u64;
                }
            }
        }
        Some(hex(&h.finalize()))
    })
}

/// Whether a short exchange from `from` to `to` succeeds.
pub fn probe(from: &Host, to: SocketAddr) -> bool {
    fetch(from, to, 64, Duration::from_millis(1500)).is_some()
}

/// A UDP echo server on `ip:port` in `host`'s namespace, for the life of
/// the namespace.
pub fn serve_udp(host: &Host, ip: IpAddr, port: u16) {
    let sock = in_netns(&host.path(), move || {
        std::net::UdpSocket::bind(SocketAddr::new(ip, port))
    })
    .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// Whether a datagram from `from` to `to` is answered (three tries over
/// 1.5 s: a datagram has no retransmission of its own).
pub fn udp_probe(from: &Host, to: SocketAddr) -> bool {
    in_netns(&from.path(), move || {
        let any: IpAddr = if to.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let Ok(s) = std::net::UdpSocket::bind(SocketAddr::new(any, 0)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 64];
        (0..3).any(|i| {
            let msg = [b'p', i];
            s.send_to(&msg, to).is_ok()
                && matches!(s.recv_from(&mut buf), Ok((2, peer)) if peer == to && buf[..2] == msg)
        })
    })
}

/// An open connection kept for later (established-flow tests).
pub fn open(from: &Host, to: SocketAddr) -> Option<TcpStream> {
    in_netns(&from.path(), move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok()
    })
}

/// On an open connection to `serve`: ask for `n` bytes and check them.
pub fn exchange(s: &mut TcpStream, n: u64) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(&n.to_be_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; n as usize];
    s.read_exact(&mut buf).is_ok()
        && buf
            .iter()
            .enumerate()
            .all(|(i, b)| *b == stream_byte(i as u64))
}
