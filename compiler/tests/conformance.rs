//! Runs every case under testdata/conformance through `trireme matrix -o json`
//! (the real binary, through the JSON contract) and compares every
//! non-loopback cell with the expectation transcribed from upstream.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    pods: Vec<String>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Step {
    #[serde(default)]
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    policies: String,
    probes: Vec<Probe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    port: String,
    expect: Vec<String>,
}

#[derive(Deserialize)]
struct Cell {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    allowed: bool,
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn index_of(name: &str) -> usize {
    match name {
        "x" | "a" => 1,
        "y" | "b" => 2,
        "z" | "c" => 3,
        other => panic!("unknown model name {other}"),
    }
}

/// The upstream model as a cluster snapshot: every pod serves 80 and 81 over
/// TCP, UDP and SCTP with upstream's container port names.
fn cluster_yaml(case: &Case, step: &Step) -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        let mut labels = BTreeMap::from([("ns".to_string(), ns.to_string())]);
        labels.extend(step.namespace_labels.get(ns).cloned().unwrap_or_default());
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {}}}\n",
            serde_json::to_string(&labels).unwrap()
        ));
    }
    for pod in &case.pods {
        let (ns, name) = pod.split_once('/').unwrap();
        let mut labels = BTreeMap::from([("pod".to_string(), name.to_string())]);
        labels.extend(step.pod_labels.get(pod).cloned().unwrap_or_default());
        let mut containers = Vec::new();
        for port in [80, 81] {
            for proto in ["TCP", "UDP", "SCTP"] {
                let lower = proto.to_lowercase();
                containers.push(format!(
                    "{{name: cont-{port}-{lower}, image: agnhost, ports: [{{containerPort: {port}, name: serve-{port}-{lower}, protocol: {proto}}}]}}"
                ));
            }
        }
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {}}}\nspec: {{containers: [{}]}}\nstatus: {{podIP: 198.18.{}.{}}}\n",
            serde_json::to_string(&labels).unwrap(),
            containers.join(", "),
            index_of(ns),
            index_of(name)
        ));
    }
    out
}

fn peer_matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pns, ppod) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (ns, name) = pod.split_once('/').unwrap();
    (pns == "*" || pns == ns) && (ppod == "*" || ppod == name)
}

/// Upstream's Reachability: start all-allowed, apply overrides in order.
fn expected(pods: &[String], ops: &[String]) -> BTreeMap<(String, String), bool> {
    let mut table = BTreeMap::new();
    for f in pods {
        for t in pods {
            table.insert((f.clone(), t.clone()), true);
        }
    }
    for op in ops {
        let (pair, verdict) = op
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("bad expectation {op:?}"));
        let (from, to) = pair
            .split_once("->")
            .unwrap_or_else(|| panic!("bad expectation {op:?}"));
        let allowed = match verdict.trim() {
            "allow" => true,
            "deny" => false,
            v => panic!("bad verdict {v:?} in {op:?}"),
        };
        for ((f, t), cell) in table.iter_mut() {
            if peer_matches(from.trim(), f) && peer_matches(to.trim(), t) {
                *cell = allowed;
            }
        }
    }
    table
}

fn run_step(dir: &Path, case: &Case, step_no: usize, step: &Step) -> Vec<String> {
    let cluster = dir.join("cluster.yaml");
    let policies = dir.join("policies.yaml");
    std::fs::write(&cluster, cluster_yaml(case, step)).unwrap();
    std::fs::write(&policies, &step.policies).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trireme"));
    cmd.arg("matrix")
        .arg("-f")
        .arg(&cluster)
        .arg("-f")
        .arg(&policies)
        .args(["-o", "json"]);
    for p in &step.probes {
        cmd.args(["--port", &p.port]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}: step {step_no}: trireme failed:\n{}",
        case.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let cells: Vec<Cell> = serde_json::from_slice(&out.stdout).unwrap();
    let mut failures = Vec::new();
    for p in &step.probes {
        let (port, proto) = p.port.split_once('/').unwrap();
        let port: u16 = port.parse().unwrap();
        let want = expected(&case.pods, &p.expect);
        let got: BTreeMap<(String, String), bool> = cells
            .iter()
            .filter(|c| c.port == port && c.protocol == proto)
            .map(|c| ((c.from.clone(), c.to.clone()), c.allowed))
            .collect();
        assert_eq!(
            got.len(),
            want.len(),
            "{}: {} cells for {}",
            case.name,
            got.len(),
            p.port
        );
        for ((f, t), w) in &want {
            if f == t {
                continue; // loopback is not graded upstream either
            }
            let g = got[&(f.clone(), t.clone())];
            if g != *w {
                failures.push(format!(
                    "{}: step {step_no}: {f} -> {t} on {}: expected {}, got {}",
                    case.name,
                    p.port,
                    if *w { "allow" } else { "deny" },
                    if g { "allow" } else { "deny" }
                ));
            }
        }
    }
    failures
}

fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/conformance");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn conformance_cases_match_trireme_matrix() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut failures = Vec::new();
    let mut cases = 0;
    let mut cells = 0;
    for file in case_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let parsed: Vec<Case> =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for case in &parsed {
            cases += 1;
            for (i, step) in case.steps.iter().enumerate() {
                cells += step.probes.len() * case.pods.len() * case.pods.len();
                failures.extend(run_step(&tmp, case, i + 1, step));
            }
        }
    }
    assert!(cases >= 60, "only {cases} conformance cases found");
    assert!(
        failures.is_empty(),
        "{} mismatched cells:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{cases} conformance cases, {cells} cells checked");
}
