//! WASM plugins in the node runtime, for real: two nodes in network
//! namespaces, real TCP. The teams come from the image-team resolver (built
//! from source), the deny-list decide hook answers the admin tier's `ask`
//! on the destination node, and a hostile hook loaded by a live reload
//! fails closed without taking the runtime down. Needs root.

mod common;
use common::*;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use trireme_compiler::plugins::{self, PluginSpec};
use trireme_compiler::{compile, source};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn built() -> PathBuf {
    let out = root().join("target/plugins");
    let st = Command::new("bash")
        .arg(root().join("policies-wasm/build.sh"))
        .arg(&out)
        .status()
        .expect("running policies-wasm/build.sh");
    assert!(st.success(), "policies-wasm/build.sh failed");
    out
}

/// The shop example's policies, compiled with these decide-list settings
/// or module.
fn ruleset(lab: &Lab, name: &str, deny_list: PluginSpec) -> PathBuf {
    let d = built();
    let specs = vec![
        deny_list,
        PluginSpec::from_files("image-team", &d.join("image_team.wasm"), None, false).unwrap(),
    ];
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let loaded =
        source::load_with(&[root().join("testdata/plugins/policies.trireme")], &names).unwrap();
    let mut rs = compile::compile(&loaded);
    plugins::embed(&mut rs, specs).unwrap();
    let out = lab.dir.join(name);
    std::fs::write(&out, rs.encode()).unwrap();
    out
}

fn pu(name: &str, h: &Host, labels: &str, image: &str) -> String {
    format!(
        "- {{name: {name}, netns: {}, namespace: shop, labels: {{{labels}}}, images: [\"{image}\"]}}\n",
        h.ns
    )
}

fn at(h: &Host, port: u16) -> SocketAddr {
    SocketAddr::new(h.ip4, port)
}

#[test]
fn resolver_and_decide_hook_on_two_nodes() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let mut lab = lab("wasm");
    let api = lab.host("api", "198.18.3.1", "fd00::3:1");
    let web = lab.host("web", "198.18.3.2", "fd00::3:2");
    let ledger = lab.host("ledger", "198.18.3.3", "fd00::3:3");
    let impostor = lab.host("imp", "198.18.3.4", "fd00::3:4");
    let d = built();
    let good = ruleset(
        &lab,
        "good.bin",
        PluginSpec::from_files(
            "deny-list",
            &d.join("deny_list.wasm"),
            Some(&root().join("testdata/plugins/deny-list.yaml")),
            false,
        )
        .unwrap(),
    );
    let psk = lab.write("psk", "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=");
    let keys = format!("{{psk: {}}}", psk.display());
    let a = format!(
        "node: node-a\nruleset: {}\nkeys: {keys}\npus:\n{}{}{}",
        good.display(),
        pu(
            "web",
            &web,
            "app: web",
            "registry.example.com/storefront/web:3"
        ),
        pu(
            "ledger",
            &ledger,
            "app: ledger",
            "registry.example.com/payments/ledger:2"
        ),
        pu(
            "impostor",
            &impostor,
            "app: impostor, team: payments",
            "registry.example.com/storefront/tools:1"
        ),
    );
    let b = format!(
        "node: node-b\nruleset: {}\nkeys: {keys}\npus:\n{}",
        good.display(),
        pu(
            "api",
            &api,
            "app: api",
            "registry.example.com/payments/api:1.4"
        ),
    );
    lab.start("a", &a);
    let nb = lab.start("b", &b);
    serve(&api, api.ip4, 8080);
    serve(&api, api.ip4, 8443);

    // Teams come from images: the storefront may use 8080.
    assert!(probe(&web, at(&api, 8080)), "storefront -> payments:8080");
    assert!(probe(&ledger, at(&api, 8443)), "payments -> payments:8443");
    // The deny-list hook on node B vetoes the storefront on 8443, and the
    // impostor's own team=payments label lost to its image.
    assert!(
        !probe(&web, at(&api, 8443)),
        "deny-list: storefront -> 8443"
    );
    assert!(!probe(&impostor, at(&api, 8443)), "impostor is storefront");
    assert!(probe(&impostor, at(&api, 8080)), "impostor may use 8080");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let stats = lab.stats(nb);
    assert!(stats.contains("\"deny-list\""), "{stats}");

    // A hook that never returns, loaded by a live reload: every `ask`
    // fails closed, the runtime keeps running and counts it.
    let looping = PluginSpec {
        name: "deny-list".into(),
        wasm: wat::parse_str(
            r#"(module
              (memory (export "memory") 1)
              (func (export "trireme_abi_version") (result i32) (i32.const 1))
              (func (export "trireme_alloc") (param i32) (result i32) (i32.const 1024))
              (func (export "trireme_free") (param i32 i32))
              (func (export "trireme_decide") (param i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#,
        )
        .unwrap(),
        settings: None,
        fail_open: false,
    };
    let bad = ruleset(&lab, "bad.bin", looping);
    std::fs::copy(&bad, &good).unwrap();
    lab.signal(nb, Signal::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(!probe(&ledger, at(&api, 8080)), "a failing hook denies");
    assert!(
        lab.log(nb).contains("ran out of its time budget"),
        "{}",
        lab.log(nb)
    );
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let stats = lab.stats(nb);
    assert!(stats.contains("\"timeout\""), "{stats}");
    // Back to the good ruleset: the same process answers again.
    let pid = lab.runtimes[nb].pid();
    let fixed = ruleset(
        &lab,
        "fixed.bin",
        PluginSpec::from_files("deny-list", &d.join("deny_list.wasm"), None, false).unwrap(),
    );
    std::fs::copy(&fixed, &good).unwrap();
    lab.signal(nb, Signal::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(probe(&ledger, at(&api, 8080)));
    assert_eq!(lab.runtimes[nb].pid(), pid, "same runtime process");
}
