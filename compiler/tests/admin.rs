//! AdminNetworkPolicy / BaselineAdminNetworkPolicy: the precedence
//! scenarios under testdata/admin (run through `trireme test`), and every
//! validation error at its field.

use std::path::Path;
use std::process::Command;

fn trireme(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn precedence_scenarios_pass() {
    let mut files: Vec<String> = Vec::new();
    for (dir, at_least) in [
        ("../testdata/admin", 8),
        ("../testdata/conformance/network-policy-api", 5),
    ] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let found: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path().join("test.yaml");
                p.exists().then(|| p.display().to_string())
            })
            .collect();
        assert!(found.len() >= at_least, "{dir}");
        files.extend(found);
    }
    files.sort();
    let mut args = vec!["test"];
    args.extend(files.iter().map(String::as_str));
    let o = trireme(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

fn compile_err(yaml: &str) -> String {
    let d = std::env::temp_dir().join(format!("tradmin{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(format!("p{}.yaml", yaml.len()));
    std::fs::write(&p, yaml).unwrap();
    let o = trireme(&[
        "compile",
        "-f",
        p.to_str().unwrap(),
        "-o",
        d.join("out").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "accepted:\n{yaml}");
    String::from_utf8_lossy(&o.stderr).replace(&format!("{}", p.display()), "F")
}

const ANP: &str = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n";
const CNP: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n";
const BANP: &str =
    "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\n";

#[test]
fn validation_errors_point_at_the_field() {
    let cases: &[(String, &str)] = &[
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1001\n  subject: {{namespaces: {{}}}}\n"),
            "F:5:13: error: priority 1001 is out of range (0-1000)",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  subject: {{namespaces: {{}}}}\n"),
            "needs spec.priority",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}, pods: {{namespaceSelector: {{}}, podSelector: {{}}}}}}\n"),
            "exactly one of namespaces or pods",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Maybe\n    from: [{{namespaces: {{}}}}]\n"),
            "F:8:13: error: unknown action \"Maybe\"",
        ),
        (
            format!("{BANP}metadata: {{name: default}}\nspec:\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Pass\n    from: [{{namespaces: {{}}}}]\n"),
            "a BaselineAdminNetworkPolicy allows Allow or Deny",
        ),
        (
            format!("{BANP}metadata: {{name: other}}\nspec:\n  subject: {{namespaces: {{}}}}\n"),
            "must be named \"default\"",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{networks: [10.0.0.0/8]}}]\n"),
            "allowed in egress rules only",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{{nodes: {{}}}}]\n"),
            "`nodes` peers are not supported",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{{networks: [10.0.0.1]}}]\n"),
            "is not a CIDR",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n    ports: [{{portRange: {{start: 90, end: 80}}}}]\n"),
            "end 80 must be greater than start 90",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: []\n"),
            "`from` must list 1 to 100 peers",
        ),
        (
            format!("{ANP}metadata: {{name: a, namespace: x}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n"),
            "cluster-scoped",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1\nkind: AdminNetworkPolicy\nmetadata: {name: a}\n".to_string(),
            "must have apiVersion policy.networking.k8s.io/v1alpha1",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingres: []\n"),
            "unknown field `ingres`",
        ),
    ];
    let cnp_cases: &[(String, &str)] = &[
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Middle\n  priority: 1\n  subject: {{namespaces: {{}}}}\n"),
            "F:5:9: error: unknown tier \"Middle\"",
        ),
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Allow\n    from: [{{namespaces: {{}}}}]\n"),
            "unknown action \"Allow\" (expected Accept, Deny or Pass)",
        ),
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{{networks: [10.0.0.0/8]}}]\n    protocols: [{{destinationNamedPort: http}}]\n"),
            "cannot be combined with destinationNamedPort",
        ),
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Accept\n    to: [{{domainNames: [example.org]}}]\n"),
            "`domainNames` peers are not supported",
        ),
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n    protocols: [{{tcp: {{destinationPort: {{range: {{start: 90, end: 90}}}}}}}}]\n"),
            "start port 90 must be less than end port 90",
        ),
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n    protocols: [{{tcp: {{destinationPort: {{number: 80}}}}, udp: {{destinationPort: {{number: 53}}}}}}]\n"),
            "exactly one of tcp, udp, sctp or destinationNamedPort",
        ),
        (
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{{networks: [10.0.0.0/8], bogus: 1}}]\n"),
            "unknown field `bogus`",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: a}\n".to_string(),
            "must have apiVersion policy.networking.k8s.io/v1alpha2",
        ),
    ];
    for (yaml, want) in cases.iter().chain(cnp_cases) {
        let err = compile_err(yaml);
        assert!(err.contains(want), "want {want:?} in:\n{err}\nfor:\n{yaml}");
    }
}
