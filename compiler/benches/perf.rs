//! Performance of the compiler and evaluator on synthetic clusters.
//!
//! `cargo bench -p trireme-compiler --bench perf` prints one line per target.
//! The evaluator is compared with a baseline that finds applicable policies
//! by scanning every policy (what a non-indexed engine does), in the same
//! process and on the same decisions.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trireme_compiler::eval::{Applicable, Endpoint, Evaluator, Flow};
use trireme_compiler::model::Protocol;
use trireme_compiler::ruleset::Ruleset;
use trireme_compiler::{compile, matrix, source};

const TEAMS: [&str; 8] = [
    "payments", "search", "ads", "identity", "storage", "ml", "web", "ops",
];
const APPS: [&str; 6] = ["api", "db", "cache", "worker", "frontend", "batch"];

/// A deterministic pseudo-random sequence (no dependency for a bench).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// `policies` NetworkPolicies spread over `namespaces`, in the mix of a real
/// cluster: default-deny, same-app allows, cross-namespace by team label,
/// named and ranged ports, matchExpressions, ipBlocks with excepts.
fn policies_yaml(policies: usize, namespaces: usize) -> String {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut s = String::with_capacity(policies * 700);
    for i in 0..policies {
        let ns = format!("ns-{}", i % namespaces);
        let app = rng.pick(&APPS);
        let team = rng.pick(&TEAMS);
        s.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p-{i}\n  namespace: {ns}\nspec:\n"
        ));
        match i % 5 {
            0 => s.push_str("  podSelector: {}\n  policyTypes: [Ingress]\n"),
            1 => s.push_str(&format!(
                "  podSelector:\n    matchLabels: {{app: {app}}}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {{app: frontend}}\n    ports:\n    - port: http\n    - port: 8000\n      endPort: 8100\n"
            )),
            2 => s.push_str(&format!(
                "  podSelector:\n    matchExpressions:\n    - {{key: app, operator: In, values: [{app}, worker]}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {{team: {team}}}\n      podSelector:\n        matchExpressions:\n        - {{key: tier, operator: NotIn, values: [test]}}\n    ports:\n    - {{protocol: TCP, port: 5432}}\n"
            )),
            3 => s.push_str(&format!(
                "  podSelector:\n    matchLabels: {{app: {app}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 198.18.0.0/15\n        except: [198.19.{}.0/24]\n  - to:\n    - namespaceSelector: {{}}\n      podSelector:\n        matchLabels: {{app: db}}\n    ports: [{{port: 5432}}]\n",
                i % 256
            )),
            _ => s.push_str(&format!(
                "  podSelector:\n    matchLabels: {{app: {app}, team: {team}}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {{key: env, operator: In, values: [prod, staging]}}\n  - from:\n    - podSelector: {{}}\n"
            )),
        }
    }
    s
}

/// `rules` rules of the rule language: namespace-tier allows per team and
/// app (with ports and CIDRs), one admin policy per 25 of them (ordered
/// deny/pass/allow on namespace labels), and a baseline.
fn rules_text(rules: usize) -> String {
    let mut rng = Rng(0x51f15e);
    let mut s = String::with_capacity(rules * 90);
    let mut n = 0;
    let mut p = 0;
    while n < rules {
        let team = rng.pick(&TEAMS);
        let app = rng.pick(&APPS);
        if p % 25 == 0 {
            s.push_str(&format!(
                "policy admin-{p} tier admin priority {} {{\n  select @ns:team = {team}\n  deny ingress from @ns:env = dev on tcp/5432\n  pass ingress from @ns:team = {team}\n  allow egress to cidr 10.{}.0.0/16 except 10.{}.1.0/24 on udp/53\n  deny egress to app = {app}, tier = test\n}}\n",
                p % 1000,
                p % 256,
                p % 256
            ));
            n += 4;
        } else {
            s.push_str(&format!(
                "policy ns-{p} {{\n  select @ns:team = {team}, app = {app}\n  allow ingress from app = frontend on tcp/http, tcp/8000-8100\n  allow ingress from @ns:env in (prod, staging), tier != test on tcp/5432\n  allow egress to app = db or cidr 198.18.0.0/15 except 198.19.{}.0/24 on tcp/5432\n  isolate egress\n}}\n",
                p % 256
            ));
            n += 4;
        }
        p += 1;
    }
    s.push_str("policy baseline tier baseline {\n  select any\n  allow ingress from @ns:env = prod\n  deny ingress\n}\n");
    s
}

fn cluster_yaml(pods: usize, namespaces: usize) -> String {
    let mut rng = Rng(42);
    let mut s = String::new();
    for n in 0..namespaces {
        let env = ["prod", "staging", "dev"][n % 3];
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{team: {}, env: {env}}}}}\n",
            TEAMS[n % TEAMS.len()]
        ));
    }
    for p in 0..pods {
        let ns = p % namespaces;
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: ns-{ns}, labels: {{app: {}, team: {}, tier: {}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 80}}, {{containerPort: 5432}}]}}]}}\nstatus: {{podIP: 198.18.{}.{}}}\n",
            rng.pick(&APPS),
            rng.pick(&TEAMS),
            rng.pick(&["prod", "test"]),
            p / 250,
            p % 250 + 1
        ));
    }
    s
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// Peak resident memory of this process (Linux; None elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Child mode: compile one file and report peak memory, so that the
    // measurement excludes the generator and the rest of the bench.
    if args.get(1).map(String::as_str) == Some("--compile-child") {
        let t = Instant::now();
        let loaded = source::load(&[PathBuf::from(&args[2])]).expect("valid synthetic input");
        let rs = compile::compile(&loaded);
        let bytes = rs.encode();
        std::fs::write(&args[3], &bytes).unwrap();
        println!(
            "{} {}",
            t.elapsed().as_secs_f64(),
            peak_rss_mib().unwrap_or(f64::NAN)
        );
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trireme-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policies = write(&dir, "policies.yaml", &policies_yaml(10_000, 1_000));
    let out = dir.join("ruleset.out");

    // 1. Compile 10,000 policies / 1,000 namespaces (parse, validate, compile, encode, write).
    let mut times = Vec::new();
    let mut rss = 0.0f64;
    for _ in 0..5 {
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--compile-child",
                policies.to_str().unwrap(),
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let mut parts = text.split_whitespace();
        times.push(Duration::from_secs_f64(
            parts.next().unwrap().parse().unwrap(),
        ));
        rss = rss.max(parts.next().unwrap().parse().unwrap());
    }
    let yaml_mib = std::fs::metadata(&policies).unwrap().len() as f64 / (1 << 20) as f64;
    println!(
        "compile 10k policies / 1k namespaces ({yaml_mib:.1} MiB YAML): median {:.0} ms, peak RSS {rss:.0} MiB",
        median(times).as_secs_f64() * 1e3
    );

    // 2. Load the compiled ruleset (read, verify hash, decode, build indexes).
    let bytes = std::fs::read(&out).unwrap();
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let b = std::fs::read(&out).unwrap();
        let rs = Ruleset::decode(&b).unwrap();
        let ev = Evaluator::new(&rs);
        black_box(&ev);
        times.push(t.elapsed());
    }
    println!(
        "load ruleset ({} KiB, 10k policies) + index: median {:.1} ms",
        bytes.len() / 1024,
        median(times).as_secs_f64() * 1e3
    );

    // 3. One decision with 10,000 policies loaded, indexed vs scanning.
    let rs = Ruleset::decode(&bytes).unwrap();
    let ev = Evaluator::new(&rs);
    let cluster_file = write(&dir, "cluster.yaml", &cluster_yaml(2_000, 1_000));
    let cluster = source::load(&[cluster_file]).unwrap().cluster;
    let ws = &cluster.workloads;
    let mut rng = Rng(7);
    let pairs: Vec<(usize, usize)> = (0..4096)
        .map(|_| {
            (
                (rng.next() % ws.len() as u64) as usize,
                (rng.next() % ws.len() as u64) as usize,
            )
        })
        .collect();
    let ep = |i: usize| Endpoint {
        identity: Some(&ws[i].identity),
        ip: ws[i].pod.ips.first().copied(),
        ports: &ws[i].pod.ports,
        node: None,
    };
    // Every decision measured is a TCP connection to the database port.
    let flow = |s: usize, d: usize| Flow {
        src: ep(s),
        dst: ep(d),
        port: 5432,
        protocol: Protocol::Tcp,
    };
    let per_decision = |f: &dyn Fn(usize, usize) -> bool| {
        // One untimed pass first, so the first variant measured is not
        // penalised by cold caches.
        for &(s, d) in &pairs {
            black_box(f(s, d));
        }
        let mut samples = Vec::new();
        for chunk in pairs.chunks(64) {
            let t = Instant::now();
            for &(s, d) in chunk {
                black_box(f(s, d));
            }
            samples.push(t.elapsed() / chunk.len() as u32);
        }
        median(samples)
    };
    let indexed = per_decision(&|s, d| ev.allowed(&flow(s, d)));
    let explained = per_decision(&|s, d| ev.evaluate(&flow(s, d)).allowed);
    let lookup = per_decision(&|s, _| !ev.applicable(&ws[s].identity).policies().is_empty());
    // The runtime knows its PUs' applicable policies in advance.
    let apps: Vec<_> = ws.iter().map(|w| ev.applicable(&w.identity)).collect();
    let pre = per_decision(&|s, d| ev.allowed_with(&flow(s, d), Some(&apps[s]), Some(&apps[d])));
    // Baseline: find applicable policies by testing every subject selector.
    let scan = per_decision(&|s, d| {
        let app = |i: usize| {
            let apps: Vec<u32> = (0..rs.policies.len() as u32)
                .filter(|&p| rs.policies[p as usize].subject.matches(&ws[i].identity))
                .collect();
            apps
        };
        let (a, b) = (app(s), app(d));
        ev.allowed_with(
            &flow(s, d),
            Some(&Applicable::from_vec(a)),
            Some(&Applicable::from_vec(b)),
        )
    });
    let ns = |d: Duration| d.as_nanos() as f64;
    println!(
        "decision (10k policies): median {:.0} ns indexed vs {:.0} ns scanning all policies (x{:.0}); {:.0} ns with explanation; {:.0} ns with precomputed per-workload policies; {:.0} ns to find one identity's policies",
        ns(indexed),
        ns(scan),
        ns(scan) / ns(indexed).max(1.0),
        ns(explained),
        ns(pre),
        ns(lookup)
    );

    // 4. Matrix: 1,000 pods x 1 port with the 10k-policy ruleset.
    let cluster_file = write(&dir, "cluster1k.yaml", &cluster_yaml(1_000, 1_000));
    let cluster = source::load(&[cluster_file]).unwrap().cluster;
    let t = Instant::now();
    let m = matrix::compute(&ev, &cluster, &[(5432, Protocol::Tcp)]);
    let elapsed = t.elapsed();
    let allowed = m.allowed[0].iter().filter(|a| **a).count();
    println!(
        "matrix 1,000 pods x 1 port (10k policies): {:.0} ms ({allowed} of 1,000,000 allowed)",
        elapsed.as_secs_f64() * 1e3
    );

    // 5. The rule language: parse + validate + lower 10,000 rules, then
    // compile into a ruleset; and a decision with admin, namespace and
    // baseline tiers populated (the 10k NetworkPolicies plus these).
    let text = rules_text(10_000);
    let name: std::sync::Arc<str> = std::sync::Arc::from("bench.trireme");
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let l = trireme_compiler::rules::load(&name, &text, 0, &[]).unwrap();
        count = l.policies.len();
        let rs = Ruleset::new(vec!["bench.trireme".into()], l.policies);
        black_box(rs.encode());
        times.push(t.elapsed());
    }
    println!(
        "rule language: parse+validate+compile 10,000 rules ({count} policies, {} KiB): median {:.0} ms",
        text.len() / 1024,
        median(times).as_secs_f64() * 1e3
    );
    use trireme_compiler::model::Tier;
    let extra = trireme_compiler::rules::load(&name, &text, 0, &[])
        .unwrap()
        .policies;
    // (a) The 10k NetworkPolicies plus the admin and baseline tiers; (b) also
    // the 2,400 cluster-wide label policies of the namespace tier, which
    // select every workload of a team and app in every namespace (about 50
    // apply to each workload: a dense worst case).
    for dense in [false, true] {
        let mut all = rs.policies.clone();
        all.extend(
            extra
                .iter()
                .filter(|p| dense || p.tier != Tier::Namespace)
                .cloned(),
        );
        let tiers = Ruleset::new(rs.sources.clone(), all);
        let tev = Evaluator::new(&tiers);
        let tiered = per_decision(&|s, d| tev.allowed(&flow(s, d)));
        let tapps: Vec<_> = ws.iter().map(|w| tev.applicable(&w.identity)).collect();
        let tpre =
            per_decision(&|s, d| tev.allowed_with(&flow(s, d), Some(&tapps[s]), Some(&tapps[d])));
        // As the two nodes do it: each knows its own PU's policies in
        // advance and encodes the peer's labels from its token.
        let bare: Vec<_> = tapps
            .iter()
            .map(|a| Applicable::from_vec(a.policies().to_vec()))
            .collect();
        let tnodes =
            per_decision(&|s, d| tev.allowed_with(&flow(s, d), Some(&bare[s]), Some(&bare[d])));
        let avg =
            tapps.iter().map(|a| a.policies().len()).sum::<usize>() as f64 / tapps.len() as f64;
        let per_tier = |t: Tier| tiers.policies.iter().filter(|p| p.tier == t).count();
        println!(
            "decision with tiers populated ({} admin, {} namespace, {} baseline policies; {avg:.1} apply per workload): median {:.0} ns with both ends looked up; {:.0} ns as nodes decide (own policies precomputed, peer's token labels encoded); {:.0} ns with both ends precomputed",
            per_tier(Tier::Admin),
            per_tier(Tier::Namespace),
            per_tier(Tier::Baseline),
            ns(tiered),
            ns(tnodes),
            ns(tpre)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
