//! `trireme test` and `trireme diff` through the real binary: exit codes,
//! failure explanations, JUnit XML, JSON, and their error paths.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn trireme(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trtd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn header() -> String {
    let r = repo();
    format!(
        "cluster: {}/testdata/apobeer/cluster.yaml\npolicies: {}/testdata/apobeer/policy.yaml\n",
        r.display(),
        r.display()
    )
}

#[test]
fn passing_tests_exit_zero_and_write_junit() {
    let d = tmp("pass");
    let f = write(
        &d,
        "t.yaml",
        &format!(
            "{}expect:\n- from beer/frontend to beer/backend on 80/TCP: allow\n- from beer/external to beer/backend on 80: deny\n- from {{role=frontend}} in beer to beer/backend on 80: allow\n- from 203.0.113.9 to beer/backend on 80: deny\n",
            header()
        ),
    );
    let junit = d.join("out.xml");
    let o = trireme(&["test", &f, "--junit", junit.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("4 passed, 0 failed"));
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(x.contains("tests=\"4\" failures=\"0\""), "{x}");
    assert_eq!(x.matches("<testcase").count(), 4);
}

#[test]
fn a_failing_expectation_is_explained_and_exits_one() {
    let d = tmp("fail");
    let f = write(
        &d,
        "t.yaml",
        &format!(
            "{}expect:\n- from beer/frontend to beer/backend on 80/TCP: allow\n- from beer/external to beer/backend on 80/TCP: allow\n",
            header()
        ),
    );
    let junit = d.join("out.xml");
    let o = trireme(&["test", &f, "--junit", junit.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!(
            "FAIL  {f}:5: from beer/external to beer/backend on 80/TCP: expected allow, got deny"
        )),
        "{t}"
    );
    assert!(
        t.contains("isolated for ingress by NetworkPolicy beer/backend-from-frontend"),
        "{t}"
    );
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(
        x.contains("<failure message=\"expected allow, got deny\">"),
        "{x}"
    );
}

#[test]
fn bad_test_files_exit_two_with_locations() {
    let d = tmp("bad");
    let syntax = write(
        &d,
        "syntax.yaml",
        &format!(
            "{}expect:\n- from beer/frontend beer/backend on 80: allow\n- from beer/a to beer/b on 80: perhaps\n",
            header()
        ),
    );
    let o = trireme(&["test", &syntax]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains(&format!("{syntax}:4: missing ` to `")), "{t}");
    assert!(
        t.contains(&format!("{syntax}:5: expected allow or deny")),
        "{t}"
    );

    let yaml = write(&d, "yaml.yaml", "expect: [unclosed\n");
    let o = trireme(&["test", &yaml]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("yaml.yaml"), "{}", text(&o));

    let unknown = write(&d, "unknown.yaml", "expect: []\nclustr: x.yaml\n");
    let o = trireme(&["test", &unknown]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("clustr"), "{}", text(&o));

    let missing = write(&d, "missing.yaml", "policies: nowhere.yaml\nexpect: []\n");
    let o = trireme(&["test", &missing]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("nowhere.yaml"), "{}", text(&o));
}

#[test]
fn diff_lists_changed_flows_and_gates_on_exit_status() {
    let d = tmp("diff");
    let r = repo();
    let old = format!("{}/testdata/apobeer/policy.yaml", r.display());
    let cluster = format!("{}/testdata/apobeer/cluster.yaml", r.display());
    let new = write(
        &d,
        "new.yaml",
        &std::fs::read_to_string(&old)
            .unwrap()
            .replace("role: frontend", "role: external"),
    );
    let o = trireme(&["diff", &old, &old, "-f", &cluster]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no flow changed"));

    let o = trireme(&["diff", &old, &new, "-f", &cluster]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("2 flow(s) changed: 1 newly allowed, 1 newly denied"),
        "{t}"
    );
    assert!(
        t.contains("newly DENIED:\n  beer/frontend -> beer/backend  80/TCP"),
        "{t}"
    );
    assert!(
        t.contains("newly ALLOWED:\n  beer/external -> beer/backend  80/TCP"),
        "{t}"
    );

    // A compiled ruleset on one side, JSON out.
    let rs = d.join("old.out");
    assert!(
        trireme(&["compile", "-f", &old, "-o", rs.to_str().unwrap()])
            .status
            .success()
    );
    let o = trireme(&[
        "diff",
        rs.to_str().unwrap(),
        &new,
        "-f",
        &cluster,
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["from"], "beer/frontend");
    assert_eq!(a[0]["protocol"], "TCP");
    assert_eq!(a[0]["allowed_before"], true);
    assert_eq!(a[0]["allowed_after"], false);
    assert!(a[0]["why"][1].as_str().unwrap().contains("isolated"));
}

#[test]
fn diff_error_paths() {
    let r = repo();
    let old = format!("{}/testdata/apobeer/policy.yaml", r.display());
    let cluster = format!("{}/testdata/apobeer/cluster.yaml", r.display());
    // Policies mixed into the snapshot are refused.
    let o = trireme(&["diff", &old, &old, "-f", &cluster, "-f", &old]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("only the cluster snapshot"),
        "{}",
        text(&o)
    );
    // A file that is neither YAML nor a ruleset.
    let d = tmp("differr");
    let junk = write(&d, "junk.out", "not a ruleset");
    let o = trireme(&["diff", &junk, &old, "-f", &cluster]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("junk.out"), "{}", text(&o));
    // Nothing to compare.
    let empty = write(
        &d,
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    );
    let o = trireme(&["diff", &old, &old, "-f", &empty]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("no ports to compare") || text(&o).contains("--port"),
        "{}",
        text(&o)
    );
}

#[test]
fn explain_walks_rule_by_rule() {
    let r = repo();
    let dir = format!("{}/testdata/three-tier", r.display());
    let o = trireme(&[
        "explain",
        "-f",
        &dir,
        "--from",
        "demo/frontend",
        "--to",
        "demo/backend",
        "--port",
        "8080",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(
            "ingress at demo/backend:\n    namespace tier:\n      NetworkPolicy demo/backend"
        ),
        "{t}"
    );
    assert!(t.contains("rule #1 (allow) at "), "{t}");
    assert!(t.contains(": matches -> allow"), "{t}");
    assert!(t.contains("verdict: ALLOWED"), "{t}");
    // A port mismatch is told apart from a peer mismatch.
    let o = trireme(&[
        "check",
        "-v",
        "-f",
        &dir,
        "--from",
        "demo/frontend",
        "--to",
        "demo/backend",
        "--port",
        "9090",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("ports do not match"), "{}", text(&o));
}
