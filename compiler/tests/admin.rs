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
        let found: Vec<String> = dirs_with(dir, "test.yaml")
            .iter()
            .map(|d| d.join("test.yaml").display().to_string())
            .collect();
        assert!(found.len() >= at_least, "{dir}");
        files.extend(found);
    }
    files.sort();
    let out = trireme_test_passes(&files);
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

/// The directories under `dir` (relative to this crate) holding `file`, sorted.
fn dirs_with(dir: &str, file: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut found: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(file).exists())
        .collect();
    found.sort();
    found
}

/// Runs `trireme test` on `files`, asserts it succeeded and returns its output.
fn trireme_test_passes(files: &[String]) -> String {
    let mut args = vec!["test"];
    args.extend(files.iter().map(String::as_str));
    let o = trireme(&args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
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
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{nodes: {{}}}}]\n"),
            "`nodes` peers are allowed in egress rules only",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{{pods: {{podSelector: {{}}}}}}]\n"),
            "F:9:17: error: AdminNetworkPolicy (v1alpha1) requires pods.namespaceSelector",
        ),
        (
            format!("{ANP}metadata: {{name: a}}\nspec:\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{{nodes: {{matchExpressions: [{{key: kubernetes.io/os, operator: Near}}]}}}}]\n"),
            "Near",
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
            format!("{CNP}metadata: {{name: a}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n    ports: [{{portNumber: {{protocol: TCP, port: 80}}}}]\n"),
            "F:11:5: error: unknown field `ports` (at spec.ingress[0].ports); ClusterNetworkPolicy rules match ports with `protocols`",
        ),
        (
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: a}\n".to_string(),
            "must have apiVersion policy.networking.k8s.io/v1beta1 or v1alpha2",
        ),
    ];
    for (yaml, want) in cases.iter().chain(cnp_cases) {
        let err = compile_err(yaml);
        assert!(err.contains(want), "want {want:?} in:\n{err}\nfor:\n{yaml}");
    }
}

/// One network-policy-api conformance suite transcribed as data: the
/// manifest upstream applies, then its tests; each test starts again from
/// the manifest and its steps update objects in place, as upstream's do.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    policies: String,
    tests: Vec<SuiteTest>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteTest {
    name: String,
    /// A manifest of its own (upstream tests in one file may use several).
    #[serde(default)]
    policies: Option<String>,
    steps: Vec<Step>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    name: String,
    #[serde(default)]
    update: Option<Update>,
    expect: Vec<std::collections::BTreeMap<String, String>>,
}

/// Upstream's `Update`/`Patch`/`Delete` calls: swapping two rules,
/// replacing a field, inserting into a list, or deleting an object.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum Update {
    Swap {
        policy: String,
        #[serde(default)]
        ingress: Option<[usize; 2]>,
        #[serde(default)]
        egress: Option<[usize; 2]>,
    },
    Set {
        policy: String,
        path: Vec<serde_json::Value>,
        value: serde_json::Value,
    },
    Insert {
        policy: String,
        path: Vec<serde_json::Value>,
        index: usize,
        value: serde_json::Value,
    },
    Delete {
        policy: String,
    },
}

fn at_path<'a>(
    mut at: &'a mut serde_json::Value,
    path: &[serde_json::Value],
) -> &'a mut serde_json::Value {
    for k in path {
        at = match k {
            serde_json::Value::String(s) => &mut at[s.as_str()],
            n => &mut at[n.as_u64().unwrap() as usize],
        };
    }
    at
}

fn object<'a>(docs: &'a mut [serde_json::Value], name: &str) -> &'a mut serde_json::Value {
    docs.iter_mut()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no object named {name}"))
}

fn apply(docs: &mut Vec<serde_json::Value>, u: &Update) {
    match u {
        Update::Swap {
            policy,
            ingress,
            egress,
        } => {
            let p = object(docs, policy);
            for (dir, at) in [("ingress", ingress), ("egress", egress)] {
                if let Some([i, j]) = at {
                    p["spec"][dir].as_array_mut().unwrap().swap(*i, *j);
                }
            }
        }
        Update::Set {
            policy,
            path,
            value,
        } => *at_path(object(docs, policy), path) = value.clone(),
        Update::Insert {
            policy,
            path,
            index,
            value,
        } => at_path(object(docs, policy), path)
            .as_array_mut()
            .unwrap()
            .insert(*index, value.clone()),
        Update::Delete { policy } => {
            object(docs, policy);
            docs.retain(|d| d["metadata"]["name"] != policy.as_str());
        }
    }
}

/// Every step of every transcribed suite becomes a complete `trireme test`
/// file (the objects in force at that step, the step's probes), and one
/// `trireme test` run checks them all.
#[test]
fn network_policy_api_suites_pass() {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/conformance/network-policy-api");
    let cluster = root.join("cluster.yaml");
    let out = std::env::temp_dir().join(format!("trireme-npapi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut files = Vec::new();
    let (mut suites, mut probes) = (0, 0);
    let dirs = dirs_with("../testdata/conformance/network-policy-api", "suite.yaml");
    for dir in dirs {
        suites += 1;
        let suite: Suite =
            serde_saphyr::from_str(&std::fs::read_to_string(dir.join("suite.yaml")).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let manifest = |file: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(dir.join(file))
                .unwrap()
                .split("\n---\n")
                .map(|d| serde_saphyr::from_str(d).unwrap())
                .collect()
        };
        for (ti, test) in suite.tests.iter().enumerate() {
            let mut docs = manifest(test.policies.as_deref().unwrap_or(&suite.policies));
            for (si, step) in test.steps.iter().enumerate() {
                if let Some(u) = &step.update {
                    apply(&mut docs, u);
                }
                let d = out.join(format!(
                    "{}-{ti}-{si}",
                    dir.file_name().unwrap().to_string_lossy()
                ));
                std::fs::create_dir_all(&d).unwrap();
                // JSON is YAML: the objects exactly as updated.
                let text: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
                std::fs::write(d.join("policies.yaml"), text.join("\n---\n")).unwrap();
                let file = serde_json::json!({
                    "cluster": cluster,
                    "policies": "policies.yaml",
                    "expect": step.expect,
                });
                let header = format!("# {} / {}: {}\n", dir.display(), test.name, step.name);
                std::fs::write(d.join("test.yaml"), header + &file.to_string()).unwrap();
                probes += step.expect.len();
                files.push(d.join("test.yaml").display().to_string());
            }
        }
    }
    assert!(suites >= 45, "{suites} suites");
    let text = trireme_test_passes(&files);
    assert!(
        text.contains(&format!("{probes} passed, 0 failed")),
        "{probes} probes: {text}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
