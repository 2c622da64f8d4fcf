//! Containment: every way a module can misbehave is refused at load or fails
//! alone, with a clear error, while a well-behaved plugin in the same host
//! keeps answering. Modules are written in the WebAssembly text format so
//! each test shows exactly what the guest does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trireme_plugin_host::*;

/// A well-behaved plugin; `{resolve}`, `{decide}`, `{version}`, `{extra}`
/// are replaced to make hostile variants of it.
const TEMPLATE: &str = r#"
(module
  (import "trireme" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 16) "{\"team\":\"x\"}")
  (data (i32.const 64) "resolving")
  (func (export "trireme_abi_version") (result i32) (i32.const {version}))
  (func (export "trireme_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "trireme_free") (param i32 i32))
  (func $rec (param $d i32) (result i32)
    (i32.add (call $rec (i32.add (local.get $d) (i32.const 1))) (i32.const 1)))
  (func (export "trireme_resolve") (param $p i32) (param $n i32) (result i64)
    {resolve})
  (func (export "trireme_decide") (param $q i32) (result i32)
    {decide})
  {extra}
)"#;

const GOOD_RESOLVE: &str = r#"
    (call $log (i32.const 2) (i32.const 64) (i32.const 9))
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 12))"#;
const GOOD_DECIDE: &str = r#"
    (if (result i32) (i32.eq (i32.load16_u offset=48 (local.get $q)) (i32.const 80))
      (then (i32.const 1)) (else (i32.const 0)))"#;

fn module(resolve: &str, decide: &str, version: &str, extra: &str) -> Vec<u8> {
    let text = TEMPLATE
        .replace("{resolve}", resolve)
        .replace("{decide}", decide)
        .replace("{version}", version)
        .replace("{extra}", extra);
    wat::parse_str(text).expect("test module assembles")
}

fn good() -> Vec<u8> {
    module(GOOD_RESOLVE, GOOD_DECIDE, "1", "")
}

type Logged = Arc<Mutex<Vec<String>>>;

fn host(limits: Limits) -> (Host, Logged) {
    let logged: Logged = Arc::default();
    let sink = logged.clone();
    let host = Host::build(
        limits,
        None,
        Arc::new(move |p, l, m| sink.lock().unwrap().push(format!("{p} {l:?} {m}"))),
    )
    .unwrap();
    (host, logged)
}

fn query(port: u16) -> Query {
    Query {
        src_id: 1,
        dst_id: 2,
        src_ip: None,
        dst_ip: None,
        port,
        protocol: 6,
        direction: QueryDirection::Ingress,
    }
}

fn no_labels(_: u64) -> Option<String> {
    None
}

#[test]
fn a_good_plugin_answers_and_memoizes() {
    let (h, logged) = host(Limits::offline());
    let p = h.load("good", &good(), None, None).unwrap();
    assert!(p.hooks().resolve && p.hooks().decide && !p.hooks().init);
    let labels = p.resolve(r#"{"name":"a"}"#).unwrap();
    assert_eq!(labels.get("team").map(String::as_str), Some("x"));
    assert_eq!(
        p.decide(&query(80), &mut no_labels).unwrap(),
        Verdict::Allow
    );
    assert_eq!(
        p.decide(&query(81), &mut no_labels).unwrap(),
        Verdict::Abstain
    );
    p.resolve(r#"{"name":"a"}"#).unwrap();
    p.decide(&query(80), &mut no_labels).unwrap();
    let s = p.stats();
    assert_eq!((s.calls, s.memo_hits, s.instances), (3, 2, 1));
    assert!(s.failures.is_empty());
    assert_eq!(logged.lock().unwrap().as_slice(), ["good Info resolving"]);
}

/// Runs `call` on a hostile plugin loaded beside a good one, and checks the
/// failure kind, that it is logged once however often it happens, and that
/// the good plugin is unaffected.
fn contained(
    limits: Limits,
    wasm: Vec<u8>,
    expect: &str,
    call: impl Fn(&Plugin) -> Result<(), CallError>,
) {
    let (h, logged) = host(limits);
    let good = h.load("good", &good(), None, None).unwrap();
    let bad = h.load("bad", &wasm, None, None).unwrap();
    for _ in 0..3 {
        let err = call(&bad).expect_err("hostile call must fail");
        assert_eq!(err.kind(), expect, "{err}");
        assert_eq!(
            good.decide(&query(80), &mut no_labels).unwrap(),
            Verdict::Allow
        );
        assert_eq!(good.resolve("{}").unwrap()["team"], "x");
    }
    assert_eq!(bad.stats().failures.get(expect), Some(&3));
    let lines: Vec<String> = logged
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("bad "))
        .cloned()
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {lines:?}");
    assert!(lines[0].contains("failing closed"), "{lines:?}");
}

fn resolve(p: &Plugin) -> Result<(), CallError> {
    p.resolve(r#"{"name":"a"}"#).map(drop)
}

fn decide(p: &Plugin) -> Result<(), CallError> {
    p.decide(&query(80), &mut no_labels).map(drop)
}

const LOOP: &str = "(loop $l (br $l)) (unreachable)";

#[test]
fn an_infinite_loop_runs_out_of_fuel() {
    contained(
        Limits::offline(),
        module(LOOP, GOOD_DECIDE, "1", ""),
        "timeout",
        resolve,
    );
}

#[test]
fn an_infinite_loop_hits_the_epoch_deadline() {
    let limits = Limits {
        budget: Budget::Deadline(Duration::from_millis(5)),
        ..Limits::runtime()
    };
    let t = Instant::now();
    contained(
        limits,
        module(GOOD_RESOLVE, LOOP, "1", ""),
        "timeout",
        decide,
    );
    // Three loops at a 5 ms deadline (plus one tick of slack each).
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_memory_bomb_hits_the_cap() {
    let bomb =
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (unreachable)";
    contained(
        Limits::offline(),
        module(bomb, GOOD_DECIDE, "1", ""),
        "memory",
        resolve,
    );
}

#[test]
fn deep_recursion_exhausts_the_stack() {
    let rec = "(i64.extend_i32_u (call $rec (i32.const 0)))";
    contained(
        Limits::offline(),
        module(rec, GOOD_DECIDE, "1", ""),
        "stack_overflow",
        resolve,
    );
}

#[test]
fn huge_output_is_refused() {
    // 1 MiB claimed: over the 64 KiB output limit, before any read.
    let huge = "(i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 1048576))";
    contained(
        Limits::offline(),
        module(huge, GOOD_DECIDE, "1", ""),
        "bad_output",
        resolve,
    );
    // In bounds of the limit but outside the guest's memory.
    let outside = "(i64.or (i64.shl (i64.const 65530) (i64.const 32)) (i64.const 100))";
    contained(
        Limits::offline(),
        module(outside, GOOD_DECIDE, "1", ""),
        "bad_output",
        resolve,
    );
}

#[test]
fn a_trap_is_contained() {
    contained(
        Limits::offline(),
        module("(unreachable)", GOOD_DECIDE, "1", ""),
        "trap",
        resolve,
    );
    contained(
        Limits::offline(),
        module(
            GOOD_RESOLVE,
            "(i32.div_u (i32.const 1) (i32.const 0))",
            "1",
            "",
        ),
        "trap",
        decide,
    );
}

#[test]
fn bad_verdicts_and_refusals() {
    contained(
        Limits::offline(),
        module(GOOD_RESOLVE, "(i32.const 7)", "1", ""),
        "bad_output",
        decide,
    );
    contained(
        Limits::offline(),
        module("(i64.const -3)", GOOD_DECIDE, "1", ""),
        "refused",
        resolve,
    );
    // Labels that are not a flat string object.
    let data = r#"(data (i32.const 200) "{\"@namespace\":\"kube-system\"}")"#;
    let forged = "(i64.or (i64.shl (i64.const 200) (i64.const 32)) (i64.const 28))";
    contained(
        Limits::offline(),
        module(forged, GOOD_DECIDE, "1", data),
        "bad_output",
        resolve,
    );
}

fn load_err(wasm: &[u8], settings: Option<&str>) -> String {
    let (h, _) = host(Limits::offline());
    h.load("bad", wasm, None, settings)
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn wrong_abi_version_is_refused_at_load() {
    let e = load_err(&module(GOOD_RESOLVE, GOOD_DECIDE, "2", ""), None);
    assert_eq!(e, "plugin bad: ABI version 2, this host speaks version 1");
}

#[test]
fn forbidden_imports_are_refused_at_load() {
    let wasi = r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#;
    let text = TEMPLATE
        .replace("{resolve}", GOOD_RESOLVE)
        .replace("{decide}", GOOD_DECIDE)
        .replace("{version}", "1")
        .replace("{extra}", "")
        .replacen("(import", &format!("{wasi}\n  (import"), 1);
    let e = load_err(&wat::parse_str(text).unwrap(), None);
    assert_eq!(
        e,
        "plugin bad: imports wasi_snapshot_preview1.fd_write, but ABI v1 allows only trireme.log(level: i32, ptr: i32, len: i32)"
    );
    // The right name with the wrong type is just as forbidden.
    let wrong = TEMPLATE
        .replace("(func $log (param i32 i32 i32))", "(func $log (param i32))")
        .replace("(call $log (i32.const 2) (i32.const 64) (i32.const 9))", "")
        .replace(
            "{resolve}",
            GOOD_RESOLVE
                .replace("(call $log (i32.const 2) (i32.const 64) (i32.const 9))", "")
                .as_str(),
        )
        .replace("{decide}", GOOD_DECIDE)
        .replace("{version}", "1")
        .replace("{extra}", "");
    assert!(load_err(&wat::parse_str(wrong).unwrap(), None).contains("imports trireme.log"));
}

#[test]
fn broken_exports_are_refused_at_load() {
    let no_alloc = good_text().replace("\"trireme_alloc\"", "\"malloc\"");
    assert_eq!(
        load_err(&wat::parse_str(no_alloc).unwrap(), None),
        "plugin bad: missing export `trireme_alloc` (ABI v1 requires it)"
    );
    let no_hooks = good_text()
        .replace("\"trireme_resolve\"", "\"x\"")
        .replace("\"trireme_decide\"", "\"y\"");
    assert!(
        load_err(&wat::parse_str(no_hooks).unwrap(), None)
            .contains("neither trireme_resolve nor trireme_decide")
    );
    let wrong_type = good_text().replace(
        "(func (export \"trireme_decide\") (param $q i32) (result i32)",
        "(func (export \"trireme_decide\") (param $q i32) (param i32) (result i32)",
    );
    assert_eq!(
        load_err(&wat::parse_str(wrong_type).unwrap(), None),
        "plugin bad: export `trireme_decide` has the wrong type: expected (i32) -> i32"
    );
    assert!(
        load_err(b"\0asm\x01\0\0\0garbage", None)
            .starts_with("plugin bad: not a valid WebAssembly module")
    );
    assert!(load_err(&good(), Some("{}")).contains("no trireme_init"));
}

fn good_text() -> String {
    TEMPLATE
        .replace("{resolve}", GOOD_RESOLVE)
        .replace("{decide}", GOOD_DECIDE)
        .replace("{version}", "1")
        .replace("{extra}", "")
}

#[test]
fn hostile_start_up_is_contained() {
    // A start function that never returns, and a memory over the cap.
    let looping = good_text().replace("{extra}", "").replacen(
        "(func $rec",
        "(func $spin (loop $l (br $l)))\n  (start $spin)\n  (func $rec",
        1,
    );
    let e = load_err(&wat::parse_str(looping).unwrap(), None);
    assert!(
        e.contains("start-up failed") && e.contains("time budget"),
        "{e}"
    );
    let big = good_text().replace(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 1024)",
    );
    let e = load_err(&wat::parse_str(big).unwrap(), None);
    assert!(
        e.contains("start-up failed") && e.contains("memory limit"),
        "{e}"
    );
}

#[test]
fn metadata_section_is_read_and_checked() {
    let with = |json: &str| {
        let text = good_text().replacen(
            "(memory",
            &format!(
                "(@custom \"trireme.plugin\" \"{}\")\n  (memory",
                json.replace('"', "\\\"")
            ),
            1,
        );
        wat::parse_str(text).unwrap()
    };
    let (h, _) = host(Limits::offline());
    let p = h
        .load(
            "m",
            &with(r#"{"name":"team","version":"1.2.0","abi":1}"#),
            None,
            None,
        )
        .unwrap();
    assert_eq!(p.metadata().unwrap().version, "1.2.0");
    assert!(load_err(&with(r#"{"name":"team","abi":2}"#,), None).contains("declares ABI 2"));
    assert!(load_err(&with(r#"{"nam":"team","abi":1}"#), None).contains("metadata"));
}

#[test]
fn a_pinned_digest_must_match() {
    let (h, _) = host(Limits::offline());
    let e = h
        .load("p", &good(), Some([0; 32]), None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("plugin p: sha256 is "), "{e}");
}

#[test]
fn compiled_modules_are_cached_on_disk() {
    let dir = std::env::temp_dir().join(format!("trireme-plugin-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mk = || Host::build(Limits::offline(), Some(dir.clone()), Arc::new(|_, _, _| {})).unwrap();
    mk().load("a", &good(), None, None).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1);
    // A fresh host (another process, in effect) loads it without compiling.
    let p = mk().load("a", &good(), None, None).unwrap();
    assert_eq!(
        p.decide(&query(80), &mut no_labels).unwrap(),
        Verdict::Allow
    );
    // A corrupted cache file is recompiled, not trusted.
    let f = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&f, b"junk").unwrap();
    let p = mk().load("a", &good(), None, None).unwrap();
    assert_eq!(
        p.decide(&query(80), &mut no_labels).unwrap(),
        Verdict::Allow
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn identities_are_announced_once_per_instance() {
    // Counts announcements in a global; decide answers that count.
    let extra = r#"
  (global $seen (mut i32) (i32.const 0))
  (func (export "trireme_identity") (param i64 i32 i32)
    (global.set $seen (i32.add (global.get $seen) (i32.const 1))))"#;
    let wasm = module(GOOD_RESOLVE, "(global.get $seen)", "1", extra);
    let (h, _) = host(Limits::offline());
    let p = h.load("ids", &wasm, None, None).unwrap();
    let mut asked = Vec::new();
    let mut labels = |id: u64| {
        asked.push(id);
        Some(format!("{{\"id\":\"{id}\"}}"))
    };
    // First call announces ids 1 and 2: the guest answers 2 (= deny).
    assert_eq!(p.decide(&query(1), &mut labels).unwrap(), Verdict::Deny);
    // A different port, same ids: no new announcement; still 2.
    assert_eq!(p.decide(&query(2), &mut labels).unwrap(), Verdict::Deny);
    assert_eq!(asked, [1, 2]);
}
