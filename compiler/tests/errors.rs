//! Every rejection path of the loader and CLI: a clear message with
//! file:line:column, exit status 2, nothing written, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("errors");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn trireme(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(args)
        .output()
        .unwrap()
}

/// Compiling `text` fails with exit 2, writes nothing, and reports `want`
/// (a `line:col: error: message` fragment).
fn rejects(name: &str, text: &str, want: &[&str]) {
    let file = tmp(&format!("{name}.yaml"), text);
    let out_path = file.with_extension("out");
    let _ = std::fs::remove_file(&out_path);
    let out = trireme(&[
        "compile",
        "-f",
        file.to_str().unwrap(),
        "-o",
        out_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: expected exit 2, stderr:\n{stderr}"
    );
    assert!(!out_path.exists(), "{name}: output written despite errors");
    assert!(!stderr.contains("panicked"), "{name}: panic:\n{stderr}");
    for w in want {
        assert!(stderr.contains(w), "{name}: expected {w:?} in:\n{stderr}");
    }
}

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\nspec:\n";

fn np(spec: &str) -> String {
    format!("{NP}{spec}")
}

#[test]
fn unknown_field_is_an_error_with_its_location() {
    rejects(
        "typo",
        &np("  podSelector: {}\n  ingres:\n  - {}\n"),
        &["typo.yaml:8:3: error: unknown field `ingres`"],
    );
    rejects(
        "typo-deep",
        &np("  podSelector:\n    matchLabel: {a: b}\n"),
        &["typo-deep.yaml:8:5: error: unknown field `matchLabel`"],
    );
}

#[test]
fn unknown_kind_and_api_version() {
    rejects(
        "kind",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        &["kind.yaml:2:7: error: unsupported kind \"Deployment\""],
    );
    rejects(
        "apiver",
        "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: d}\n",
        &["apiver.yaml:2:7: error: NetworkPolicy must have apiVersion networking.k8s.io/v1"],
    );
    rejects(
        "nokind",
        "apiVersion: v1\nmetadata: {name: d}\n",
        &["nokind.yaml:1:1: error: object has no `kind`"],
    );
    rejects(
        "list-item",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n",
        &["list-item.yaml:5:9: error: unsupported kind \"Service\""],
    );
}

#[test]
fn wrong_types_and_yaml_syntax() {
    rejects(
        "type",
        &np("  podSelector: {}\n  ingress:\n  - ports:\n    - port: [80]\n"),
        &["type.yaml:10:"],
    );
    rejects(
        "syntax",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x\n",
        &["syntax.yaml:", "invalid YAML"],
    );
    rejects(
        "dupkey",
        &np("  podSelector: {}\n  podSelector: {}\n"),
        &["dupkey.yaml:8:", "duplicate"],
    );
}

#[test]
fn duplicate_objects_name_both_places() {
    let two = format!(
        "{}---\n{}",
        np("  podSelector: {}\n"),
        np("  podSelector: {}\n")
    );
    rejects(
        "dupobj",
        &two,
        &[
            "dupobj.yaml:9:1: error: duplicate NetworkPolicy x/p",
            "dupobj.yaml:1:1: note: first defined here",
        ],
    );
}

#[test]
fn invalid_values() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "label-key",
            "  podSelector: {matchLabels: {\"bad key\": v}}\n",
            "7:31: error: label key \"bad key\"",
        ),
        (
            "label-value",
            "  podSelector: {matchLabels: {app: \"-v\"}}\n",
            "7:36: error: label value \"-v\"",
        ),
        (
            "port0",
            "  ingress: [{ports: [{port: 0}]}]\n",
            "7:29: error: port 0 is out of range",
        ),
        (
            "port-big",
            "  ingress: [{ports: [{port: 70000}]}]\n",
            "7:29: error: port 70000 is out of range",
        ),
        (
            "endport-lt",
            "  ingress: [{ports: [{port: 90, endPort: 80}]}]\n",
            "error: endPort 80 must be greater than or equal to port 90",
        ),
        (
            "endport-named",
            "  ingress: [{ports: [{port: http, endPort: 80}]}]\n",
            "error: endPort may only be used with a numeric `port`",
        ),
        (
            "endport-alone",
            "  ingress: [{ports: [{endPort: 80}]}]\n",
            "error: endPort requires a numeric `port`",
        ),
        (
            "port-name",
            "  ingress: [{ports: [{port: Not_A_Name}]}]\n",
            "error: port name \"Not_A_Name\"",
        ),
        (
            "protocol",
            "  ingress: [{ports: [{protocol: ICMP}]}]\n",
            "error: unsupported protocol \"ICMP\"",
        ),
        (
            "cidr",
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
            "7:35: error: \"10.0.0.0/33\" is not a valid CIDR",
        ),
        (
            "except-outside",
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n",
            "error: except 11.0.0.0/16 must be a strict subset of cidr 10.0.0.0/8",
        ),
        (
            "except-equal",
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]\n",
            "must be a strict subset",
        ),
        (
            "operator",
            "  podSelector: {matchExpressions: [{key: a, operator: Like, values: [b]}]}\n",
            "error: unknown operator \"Like\"",
        ),
        (
            "in-no-values",
            "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
            "error: operator In requires a non-empty `values`",
        ),
        (
            "notin-empty",
            "  podSelector: {matchExpressions: [{key: a, operator: NotIn, values: []}]}\n",
            "error: operator NotIn requires a non-empty `values`",
        ),
        (
            "exists-values",
            "  podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}\n",
            "error: operator Exists must not have `values`",
        ),
        (
            "peer-both",
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
            "error: ipBlock cannot be combined",
        ),
        (
            "peer-empty",
            "  ingress: [{from: [{}]}]\n",
            "error: a peer must set podSelector, namespaceSelector or ipBlock",
        ),
        (
            "policy-type",
            "  policyTypes: [Ingress, Sideways]\n",
            "error: unknown policy type \"Sideways\"",
        ),
        (
            "policy-type-dup",
            "  policyTypes: [Ingress, Ingress]\n",
            "error: duplicate policy type Ingress",
        ),
    ];
    for (name, spec, want) in cases {
        rejects(name, &np(spec), &[want]);
    }
}

#[test]
fn invalid_metadata_and_pods() {
    rejects(
        "noname",
        "apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n",
        &["noname.yaml:3:11: error: Namespace has no metadata.name"],
    );
    rejects(
        "badns",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_NS}\n",
        &["badns.yaml:3:18: error: invalid Namespace name"],
    );
    rejects(
        "podip",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 300.1.1.1}\n",
        &["podip.yaml:5:17: error: \"300.1.1.1\" is not a valid IP address"],
    );
    rejects(
        "cport",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n",
        &["cport.yaml:4:", "port 0 is out of range"],
    );
}

#[test]
fn several_errors_are_reported_in_one_run() {
    rejects(
        "many",
        &np("  podSelector: {matchLabels: {\"a b\": c}}\n  ingress: [{ports: [{port: 0}]}]\n"),
        &["7:", "8:", "label key", "out of range"],
    );
}

#[test]
fn cli_errors_exit_2() {
    let out = trireme(&["compile", "-f", "/nonexistent/dir", "-o", "/tmp/x.out"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));

    let snap = tmp(
        "snap.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c}]}\n",
    );
    let out = trireme(&[
        "check",
        "-f",
        snap.to_str().unwrap(),
        "--from",
        "x/a",
        "--to",
        "x/zz",
        "--port",
        "80",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod \"x/zz\""));

    let out = trireme(&[
        "check",
        "-f",
        snap.to_str().unwrap(),
        "--from",
        "x/a",
        "--to",
        "x/a",
        "--port",
        "0/TCP",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = trireme(&[
        "check",
        "-f",
        snap.to_str().unwrap(),
        "--from",
        "x/a",
        "--to",
        "x/a",
        "--port",
        "80/ICMP",
    ]);
    assert_eq!(out.status.code(), Some(2));

    let garbage = tmp("garbage.out", "definitely not a ruleset");
    let out = trireme(&["inspect", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a trireme ruleset"));
}

#[test]
fn empty_snapshot_is_valid() {
    let empty = tmp("empty.yaml", "# nothing here\n");
    let out = trireme(&[
        "matrix",
        "-f",
        empty.to_str().unwrap(),
        "--port",
        "80/TCP",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));
}
