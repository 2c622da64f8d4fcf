//! The built-in examples behave as documented (check exit status 0 allowed,
//! 1 denied), both from policy files and from a compiled ruleset.

use std::path::{Path, PathBuf};
use std::process::Command;

fn td(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(p)
}

fn check(args: &[&str], from: &str, to: &str, port: &str) -> i32 {
    let out = Command::new(env!("CARGO_BIN_EXE_trireme"))
        .arg("check")
        .args(args)
        .args(["--from", from, "--to", to, "--port", port])
        .output()
        .unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.code().unwrap()
}

#[test]
fn apobeer_frontend_reaches_backend_external_does_not() {
    let dir = td("apobeer");
    let f = ["-f", dir.to_str().unwrap()];
    assert_eq!(check(&f, "beer/frontend", "beer/backend", "80/TCP"), 0);
    assert_eq!(check(&f, "beer/external", "beer/backend", "80/TCP"), 1);
    // The named port `api` is 80/TCP on the backend: 81 is not allowed.
    assert_eq!(check(&f, "beer/frontend", "beer/backend", "81/TCP"), 1);

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("apobeer.out");
    let st = Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args([
            "compile",
            "-f",
            td("apobeer/policy.yaml").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let cluster = td("apobeer/cluster.yaml");
    let r = [
        "--ruleset",
        out.to_str().unwrap(),
        "-f",
        cluster.to_str().unwrap(),
    ];
    assert_eq!(check(&r, "beer/frontend", "beer/backend", "80/TCP"), 0);
    assert_eq!(check(&r, "beer/external", "beer/backend", "80/TCP"), 1);
}

#[test]
fn three_tier_demo() {
    let dir = td("three-tier");
    let f = ["-f", dir.to_str().unwrap()];
    assert_eq!(check(&f, "demo/frontend", "demo/backend", "8080/TCP"), 0);
    assert_eq!(check(&f, "demo/external", "demo/backend", "8080/TCP"), 1);
    assert_eq!(check(&f, "demo/external", "demo/frontend", "80/TCP"), 0);
    // A non-workload address is judged by the rules alone: backend accepts only the frontend.
    assert_eq!(check(&f, "203.0.113.9", "demo/backend", "8080/TCP"), 1);
    assert_eq!(check(&f, "203.0.113.9", "demo/frontend", "80/TCP"), 0);
}
