//! Plugin call and load costs, on the example plugins built from source
//! (`policies-wasm/build.sh`, run first if needed).
//!
//! `cargo bench -p trireme-plugin-host --bench plugins` prints one line per
//! figure. Calls are measured with memoization off (every call enters the
//! guest) and on; each is compared in the same process with a guest that
//! does nothing, the floor of a host-to-guest call. Loading a module from
//! the disk cache is compared with compiling it.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trireme_plugin_host::{Budget, Host, Limits, Query, QueryDirection};

const BATCH: u32 = 2_000;
const BATCHES: usize = 31;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn per_call(mut f: impl FnMut(u32)) -> Duration {
    for i in 0..BATCH {
        f(i);
    }
    let mut xs: Vec<Duration> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for i in 0..BATCH {
                f(i);
            }
            t.elapsed() / BATCH
        })
        .collect();
    xs.sort();
    xs[BATCHES / 2]
}

fn host(memo: bool, cache: Option<PathBuf>) -> Host {
    let limits = Limits {
        budget: Budget::Deadline(Duration::from_millis(20)),
        memo_entries: if memo { 65_536 } else { 0 },
        ..Limits::runtime()
    };
    Host::build(limits, cache, Arc::new(|_, _, _| {})).unwrap()
}

const NOP: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "trireme_abi_version") (result i32) (i32.const 1))
  (func (export "trireme_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "trireme_free") (param i32 i32))
  (func (export "trireme_resolve") (param i32 i32) (result i64) (i64.const 0))
  (func (export "trireme_decide") (param i32) (result i32) (i32.const 0)))"#;

const WORKLOAD: &str = r#"{"kind":"pod","name":"api-7d9f","namespace":"shop","labels":{"app":"api","pod-template-hash":"7d9f"},"annotations":{"prometheus.io/scrape":"true"},"namespaceLabels":{"kubernetes.io/metadata.name":"shop"},"images":["registry.example.com/payments/api:1.4"]}"#;

fn main() {
    let st = std::process::Command::new("bash")
        .arg(root().join("policies-wasm/build.sh"))
        .status()
        .expect("policies-wasm/build.sh");
    assert!(st.success());
    let dir = root().join("target/plugins");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let nop = wat::parse_str(NOP).unwrap();
    println!("plugin call costs (median per call over {BATCHES} batches of {BATCH}):");

    let h = host(false, None);
    let floor = h.load("nop", &nop, None, None).unwrap();
    let t_floor = per_call(|_| {
        black_box(floor.resolve(black_box(WORKLOAD)).unwrap());
    });
    println!(
        "  resolve, empty guest (host floor):       {:>8.2?}",
        t_floor
    );
    for (f, what) in [
        ("image_team.wasm", "Rust"),
        ("image_team_c.wasm", "C"),
        ("image_team_as.wasm", "AssemblyScript"),
    ] {
        let p = h.load("it", &read(f), None, None).unwrap();
        let t = per_call(|_| {
            black_box(p.resolve(black_box(WORKLOAD)).unwrap());
        });
        println!(
            "  {:<40} {:>8.2?}  ({:.1}x the floor)",
            format!("resolve, image-team in {what}:"),
            t,
            t.as_secs_f64() / t_floor.as_secs_f64()
        );
    }
    let q = |i: u32| Query {
        src_id: 1 + u64::from(i % 64),
        dst_id: 1000 + u64::from(i % 16),
        src_ip: Some("198.18.0.1".parse().unwrap()),
        dst_ip: Some("198.18.0.2".parse().unwrap()),
        port: 8443,
        protocol: 6,
        direction: QueryDirection::Ingress,
    };
    let labels = |id: u64| {
        Some(if id >= 1000 {
            r#"{"@namespace":"shop","team":"payments"}"#.to_string()
        } else {
            r#"{"@namespace":"shop","team":"storefront"}"#.to_string()
        })
    };
    let t_dfloor = per_call(|i| {
        black_box(floor.decide(&q(i), &mut |id| labels(id)).unwrap());
    });
    println!(
        "  decide, empty guest (host floor):        {:>8.2?}",
        t_dfloor
    );
    let settings =
        r#"{"deny":[{"from":{"team":"storefront"},"to":{"team":"payments"},"ports":[8443]}]}"#;
    let dl = h
        .load("deny-list", &read("deny_list.wasm"), None, Some(settings))
        .unwrap();
    let t = per_call(|i| {
        black_box(dl.decide(&q(i), &mut |id| labels(id)).unwrap());
    });
    println!(
        "  decide, deny-list (Rust SDK):            {:>8.2?}  ({:.1}x the floor)",
        t,
        t.as_secs_f64() / t_dfloor.as_secs_f64()
    );

    let hm = host(true, None);
    let dlm = hm
        .load("deny-list", &read("deny_list.wasm"), None, Some(settings))
        .unwrap();
    let itm = hm.load("it", &read("image_team.wasm"), None, None).unwrap();
    let t = per_call(|i| {
        black_box(dlm.decide(&q(i), &mut |id| labels(id)).unwrap());
    });
    println!("  decide, memoized:                        {:>8.2?}", t);
    let t = per_call(|_| {
        black_box(itm.resolve(black_box(WORKLOAD)).unwrap());
    });
    println!("  resolve, memoized:                       {:>8.2?}", t);

    // Loading: a fresh host each time (no in-memory cache), from the disk
    // cache versus compiling.
    let cache = std::env::temp_dir().join(format!("trireme-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let wasm = read("image_team.wasm");
    host(true, Some(cache.clone()))
        .load("it", &wasm, None, None)
        .unwrap();
    let load = |cache: Option<PathBuf>, n: usize| {
        let mut xs: Vec<Duration> = (0..n)
            .map(|_| {
                let h = host(true, cache.clone());
                let t = Instant::now();
                black_box(h.load("it", &wasm, None, None).unwrap());
                t.elapsed()
            })
            .collect();
        xs.sort();
        xs[n / 2]
    };
    let cached = load(Some(cache.clone()), 31);
    let compiled = load(None, 7);
    println!(
        "  load image-team ({} KiB), cached on disk: {:>8.2?}  (compiling: {:.2?}, {:.0}x)",
        wasm.len() / 1024,
        cached,
        compiled,
        compiled.as_secs_f64() / cached.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&cache);
}
