//! WASM plugins through the compiler: the example plugins, built from
//! source (Rust, C, AssemblyScript), embedded by `compile`, run by `matrix`,
//! `check` and `test`; and every way a plugin or its use can go wrong.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use trireme_compiler::eval::Evaluator;
use trireme_compiler::model::Protocol;
use trireme_compiler::plugins::{self, PluginSpec, Plugins};
use trireme_compiler::ruleset::Ruleset;
use trireme_compiler::{compile, matrix, plugin_test, source};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the example plugins once per test binary (policies-wasm/build.sh).
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = root().join("target/plugins");
        let st = Command::new("bash")
            .arg(root().join("policies-wasm/build.sh"))
            .arg(&out)
            .status()
            .expect("running policies-wasm/build.sh");
        assert!(
            st.success(),
            "policies-wasm/build.sh failed (see README: set-up)"
        );
        out
    })
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trireme-plugin-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn shop_specs(image_team: &str) -> Vec<PluginSpec> {
    let d = built();
    vec![
        PluginSpec::from_files(
            "deny-list",
            &d.join("deny_list.wasm"),
            Some(&root().join("testdata/plugins/deny-list.yaml")),
            false,
        )
        .unwrap(),
        PluginSpec::from_files("image-team", &d.join(image_team), None, false).unwrap(),
    ]
}

/// Compiles the shop example with these plugins, round-trips the ruleset
/// through its encoding (as a node would receive it), and returns it.
fn shop_ruleset(specs: Vec<PluginSpec>) -> Ruleset {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let loaded = source::load_with(&[root().join("testdata/plugins/policies.trireme")], &names)
        .expect("policies load");
    let mut rs = compile::compile(&loaded);
    plugins::embed(&mut rs, specs).expect("plugins embed");
    Ruleset::decode(&rs.encode()).expect("round trip")
}

/// Denied pairs per port, as "from>to".
fn denied(rs: &Ruleset) -> (Vec<Vec<String>>, Vec<String>) {
    let loaded = source::load(&[root().join("testdata/plugins/cluster.yaml")]).unwrap();
    let mut cluster = loaded.cluster;
    let p = Plugins::offline(rs)
        .unwrap()
        .expect("the ruleset carries plugins");
    let warnings = p.resolve_cluster(&mut cluster);
    let ev = Evaluator::new(rs).with_hooks(&p);
    let m = matrix::compute(
        &ev,
        &cluster,
        &[(8080, Protocol::Tcp), (8443, Protocol::Tcp)],
    );
    let n = m.names.len();
    let per_port = m
        .allowed
        .iter()
        .map(|cells| {
            (0..n * n)
                .filter(|&k| !cells[k])
                .map(|k| format!("{}>{}", &m.names[k / n][5..], &m.names[k % n][5..]))
                .collect()
        })
        .collect();
    (per_port, warnings)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn shop_example_matrix_with_resolver_and_decide_hook() {
    let (d, warnings) = denied(&shop_ruleset(shop_specs("image_team.wasm")));
    assert!(warnings.is_empty(), "{warnings:?}");
    // 8080: payments (api, ledger, batch by annotation) accept payments and
    // storefront; debug has no team. The impostor's own `team: payments`
    // label is overridden by its image (storefront), which may use 8080.
    assert_eq!(d[0], s(&["debug>api", "debug>batch", "debug>ledger"]));
    // 8443: the deny-list plugin vetoes the storefront (web, impostor).
    assert_eq!(
        d[1],
        s(&[
            "debug>api",
            "debug>batch",
            "debug>ledger",
            "impostor>api",
            "impostor>batch",
            "impostor>ledger",
            "web>api",
            "web>batch",
            "web>ledger"
        ])
    );
}

#[test]
fn c_and_assemblyscript_resolvers_give_the_same_matrix() {
    let rust = denied(&shop_ruleset(shop_specs("image_team.wasm")));
    for other in ["image_team_c.wasm", "image_team_as.wasm"] {
        assert_eq!(denied(&shop_ruleset(shop_specs(other))), rust, "{other}");
    }
}

#[test]
fn examples_pass_their_recorded_cases() {
    let d = built();
    let cases = root().join("policies-wasm/examples/cases");
    for (wasm, file, n) in [
        ("image_team.wasm", "image-team.yaml", 11),
        ("image_team_c.wasm", "image-team.yaml", 11),
        ("image_team_as.wasm", "image-team.yaml", 11),
        ("deny_list.wasm", "deny-list.yaml", 5),
    ] {
        let r = plugin_test::run(&d.join(wasm), &cases.join(file)).unwrap();
        assert_eq!(r.cases.len(), n);
        for c in &r.cases {
            assert!(c.failure.is_none(), "{wasm}: {}: {:?}", c.name, c.failure);
        }
    }
}

fn trireme(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plugin_test_reports_failures_and_bad_files() {
    let d = built();
    let cases = tmp("wrong.yaml");
    let w = d.join("image_team.wasm");
    // `trireme plugin test` on these cases.
    let run = |text: &str| {
        std::fs::write(&cases, text).unwrap();
        trireme(&[
            "plugin",
            "test",
            w.to_str().unwrap(),
            cases.to_str().unwrap(),
        ])
    };
    let (code, out, _) = run(
        "cases:\n- name: wrong team\n  resolve: {images: [\"a.io/payments/api\"]}\n  expect: {team: web}\n- name: right\n  resolve: {images: [\"x/y\"]}\n  expect: {team: x}\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  wrong team: expected {\"team\":\"web\"}, got {\"team\":\"payments\"}"),
        "{out}"
    );
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    let (code, _, err) = run("cases:\n- name: both\n  expect: allow\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("give exactly one of `resolve` and `decide`"),
        "{err}"
    );
    let (code, _, err) = run("cases:\n- name: typo\n  resolv: {}\n  expect: {}\n");
    assert_eq!(code, 2);
    assert!(err.contains("resolv"), "{err}");
}

#[test]
fn cli_compile_then_matrix_check_and_test() {
    let d = built();
    let out = tmp("shop.ruleset");
    let it = format!("image-team={}", d.join("image_team_c.wasm").display());
    let dl = format!("deny-list={}", d.join("deny_list.wasm").display());
    let (code, stdout, err) = trireme(&[
        "compile",
        "-f",
        "testdata/plugins/policies.trireme",
        "--plugin",
        &it,
        "--plugin",
        &dl,
        "--plugin-config",
        "deny-list=testdata/plugins/deny-list.yaml",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("and 2 plugin(s)"), "{stdout}");
    let (code, stdout, err) = trireme(&[
        "check",
        "-v",
        "--ruleset",
        out.to_str().unwrap(),
        "-f",
        "testdata/plugins/cluster.yaml",
        "--from",
        "shop/web",
        "--to",
        "shop/api",
        "--port",
        "8443",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        stdout.contains("matches -> ask deny-list: deny"),
        "{stdout}"
    );
    let (code, stdout, _) = trireme(&[
        "matrix",
        "--ruleset",
        out.to_str().unwrap(),
        "-f",
        "testdata/plugins/cluster.yaml",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 0);
    assert!(stdout.contains("shop/debug\tX\tX\t.\t.\tX\t."), "{stdout}");
    let (code, stdout, err) = trireme(&["test", "testdata/tests/plugins.yaml"]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("0 failed"), "{stdout}");
}

fn compile_err(policy: &str, specs: Vec<PluginSpec>) -> String {
    let f = tmp("p.trireme");
    std::fs::write(&f, policy).unwrap();
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    match source::load_with(&[f], &names) {
        Err(d) => d.to_string(),
        Ok(l) => {
            let mut rs = compile::compile(&l);
            plugins::embed(&mut rs, specs).expect_err("must not compile")
        }
    }
}

#[test]
fn compile_errors_name_the_plugin_and_the_place() {
    let d = built();
    let e = compile_err(
        "policy p tier admin priority 1 {\n  select any\n  ask nope ingress\n}\n",
        vec![],
    );
    assert!(e.contains("p.trireme:3:3"), "{e}");
    assert!(e.contains("unknown plugin \"nope\" (none were given); pass it to the compiler as --plugin nope=FILE.wasm"), "{e}");
    let image =
        PluginSpec::from_files("image-team", &d.join("image_team.wasm"), None, false).unwrap();
    let e = compile_err(
        "policy p tier admin priority 1 {\n  select any\n  ask image-team egress\n}\n",
        vec![image.clone()],
    );
    assert!(
        e.ends_with("p.trireme:3:3: `ask image-team`, but that plugin exports no trireme_decide"),
        "{e}"
    );
    // A module that breaks the ABI is refused at compile time, not on a node.
    let bad = PluginSpec {
        name: "bad".into(),
        wasm: wat::parse_str(r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))))"#).unwrap(),
        settings: None,
        fail_open: false,
    };
    let e = compile_err("", vec![bad]);
    assert_eq!(
        e,
        "plugin bad: imports wasi_snapshot_preview1.fd_write, but ABI v1 allows only trireme.log(level: i32, ptr: i32, len: i32)"
    );
    // Settings the plugin refuses are a compile error too.
    let mut strict =
        PluginSpec::from_files("deny-list", &d.join("deny_list.wasm"), None, false).unwrap();
    strict.settings = Some(r#"{"deny":[{"form":{}}]}"#.into());
    let e = compile_err("", vec![strict]);
    assert!(
        e.contains("plugin deny-list: start-up failed: refused the input"),
        "{e}"
    );
    assert!(plugins::check_plugin_name("Bad Name").is_err());
}

#[test]
fn a_ruleset_with_a_swapped_module_is_refused() {
    let mut rs = shop_ruleset(shop_specs("image_team.wasm"));
    rs.plugins[1].wasm = std::fs::read(built().join("image_team_c.wasm")).unwrap();
    let e = Ruleset::decode(&rs.encode()).unwrap_err().to_string();
    assert_eq!(
        e,
        "ruleset is corrupted: plugin image-team: module does not match its sha256"
    );
}

/// A resolver that traps on every call.
const TRAPPING_RESOLVER: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "trireme_abi_version") (result i32) (i32.const 1))
  (func (export "trireme_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "trireme_free") (param i32 i32))
  (func (export "trireme_resolve") (param i32 i32) (result i64) (unreachable)))"#;

#[test]
fn a_failing_resolver_fails_closed_unless_told_otherwise() {
    let specs = |fail_open| {
        let mut v = shop_specs("image_team.wasm");
        v[1].wasm = wat::parse_str(TRAPPING_RESOLVER).unwrap();
        v[1].fail_open = fail_open;
        v
    };
    let (d, warnings) = denied(&shop_ruleset(specs(false)));
    assert_eq!(warnings.len(), 6);
    assert!(
        warnings[0].starts_with("shop/api: plugin image-team trapped: wasm trap: wasm `unreachable` instruction executed"),
        "{warnings:?}"
    );
    assert_eq!(d[0].len(), 36, "every pair is denied: {:?}", d[0]);
    // Fail-open: the resolver contributes nothing; pods keep their own
    // labels, so only the impostor (labelled team=payments) is payments.
    let (d, warnings) = denied(&shop_ruleset(specs(true)));
    assert!(warnings.is_empty());
    assert_eq!(d[0].len(), 5, "{:?}", d[0]);
    assert!(d[0].iter().all(|p| p.ends_with(">impostor")), "{:?}", d[0]);
}

/// A decide hook that never returns.
const LOOPING_DECIDER: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "trireme_abi_version") (result i32) (i32.const 1))
  (func (export "trireme_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "trireme_free") (param i32 i32))
  (func (export "trireme_decide") (param i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#;

#[test]
fn a_failing_decide_hook_denies() {
    let mut specs = shop_specs("image_team.wasm");
    specs[0] = PluginSpec {
        name: "deny-list".into(),
        wasm: wat::parse_str(LOOPING_DECIDER).unwrap(),
        settings: None,
        fail_open: false,
    };
    let rs = shop_ruleset(specs);
    let (d, _) = denied(&rs);
    assert_eq!(d[0].len(), 36, "the admin-tier ask denies every pair");
    let out = tmp("loop.ruleset");
    std::fs::write(&out, rs.encode()).unwrap();
    let (code, stdout, err) = trireme(&[
        "check",
        "-v",
        "--ruleset",
        out.to_str().unwrap(),
        "-f",
        "testdata/plugins/cluster.yaml",
        "--from",
        "shop/ledger",
        "--to",
        "shop/api",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 1);
    assert!(stdout.contains("ask deny-list: failed (deny)"), "{stdout}");
    assert!(
        err.contains("plugin deny-list: Error: ran out of its time budget"),
        "{err}"
    );
}

#[test]
fn rulesets_with_plugins_are_format_2_others_stay_1() {
    let rs = shop_ruleset(shop_specs("image_team.wasm"));
    let bytes = rs.encode();
    assert_eq!(&bytes[8..12], &[2, 0, 0, 0], "2.0");
    // Labelled 1.0 (what a 1.x reader would accept), the content is refused.
    let mut relabelled = bytes.clone();
    relabelled[8] = 1;
    let e = Ruleset::decode(&relabelled).unwrap_err().to_string();
    assert_eq!(
        e,
        "ruleset is corrupted: labelled format 1.0 but its content needs 2.x"
    );
    let plain = compile::compile(&source::load(&[root().join("testdata/apobeer")]).unwrap());
    assert_eq!(
        &plain.encode()[8..12],
        &[1, 0, 0, 0],
        "1.0, as before plugins"
    );
}

#[test]
fn diff_runs_each_sides_plugins() {
    let with = shop_ruleset(shop_specs("image_team.wasm"));
    let mut specs = shop_specs("image_team.wasm");
    specs[0].settings = Some(r#"{"deny":[]}"#.into());
    let without = shop_ruleset(specs);
    let loaded = source::load(&[root().join("testdata/plugins/cluster.yaml")]).unwrap();
    let changes = trireme_compiler::diff::compute(
        &with,
        &without,
        &loaded.cluster,
        &[(8080, Protocol::Tcp), (8443, Protocol::Tcp)],
    )
    .unwrap();
    let got: Vec<String> = changes
        .iter()
        .map(|c| format!("{}>{}:{} {}", c.from, c.to, c.port, c.allowed_after))
        .collect();
    // Emptying the deny-list opens payments' 8443 to the storefront.
    assert_eq!(
        got,
        s(&[
            "shop/impostor>shop/api:8443 true",
            "shop/impostor>shop/batch:8443 true",
            "shop/impostor>shop/ledger:8443 true",
            "shop/web>shop/api:8443 true",
            "shop/web>shop/batch:8443 true",
            "shop/web>shop/ledger:8443 true",
        ])
    );
}
