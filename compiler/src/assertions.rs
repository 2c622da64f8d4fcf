//! `trireme test`: policy tests kept beside the policies in git.
//!
//! ```yaml
//! cluster: ../testdata/apobeer/cluster.yaml   # files or directories (string or list),
//! policies: ../testdata/apobeer/policy.yaml   #   relative to this file; or `ruleset: x.out`
//! expect:
//! - from beer/frontend to beer/backend on 80/TCP: allow
//! - from beer/external to beer/backend on 80: deny
//! - from {role=frontend} in beer to beer/backend on 80: allow   # by labels
//! - from 203.0.113.9 to beer/backend on 80/TCP: deny             # an external address
//! ```

use crate::cluster::Cluster;
use crate::eval::{Endpoint, Flow};
use crate::explain;
use crate::model::{Identity, NamedPort, Protocol};
use crate::plugins::{self, PluginSpec};
use crate::ruleset::Ruleset;
use crate::{compile, source};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    cluster: OneOrMany,
    #[serde(default)]
    policies: OneOrMany,
    #[serde(default)]
    ruleset: Option<PathBuf>,
    /// WASM plugins for `policies` (a `ruleset` carries its own):
    /// `name: file.wasm`, or `name: {file, config, failOpen}`.
    #[serde(default)]
    plugins: BTreeMap<String, TestPlugin>,
    expect: Vec<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TestPlugin {
    File(PathBuf),
    Full {
        file: PathBuf,
        #[serde(default)]
        config: Option<PathBuf>,
        #[serde(default, rename = "failOpen")]
        fail_open: bool,
    },
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl OneOrMany {
    fn paths(&self, base: &Path) -> Vec<PathBuf> {
        let v: Vec<&PathBuf> = match self {
            OneOrMany::None => vec![],
            OneOrMany::One(p) => vec![p],
            OneOrMany::Many(v) => v.iter().collect(),
        };
        v.into_iter().map(|p| base.join(p)).collect()
    }
}

/// One side of an expectation.
#[derive(Debug, Clone, PartialEq)]
pub enum Party {
    Pod(String),
    Labels {
        labels: BTreeMap<String, String>,
        namespace: String,
    },
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    pub text: String,
    pub line: usize,
    pub from: Party,
    pub to: Party,
    pub port: u16,
    pub protocol: Protocol,
    pub allow: bool,
}

/// The outcome of one expectation.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub expectation: Expectation,
    /// `Err`: the expectation could not be evaluated (unknown pod, ...).
    pub result: Result<bool, String>,
    pub why: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.result
            .as_ref()
            .is_ok_and(|a| *a == self.expectation.allow)
    }
}

pub struct Report {
    pub file: String,
    pub outcomes: Vec<Outcome>,
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let inner = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or("labels must be written {key=value, ...}")?;
    let mut m = BTreeMap::new();
    for kv in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .or_else(|| kv.split_once(':'))
            .ok_or_else(|| format!("label {kv:?} must be key=value"))?;
        m.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(m)
}

fn parse_party(s: &str) -> Result<Party, String> {
    let s = s.trim();
    if s.starts_with('{') {
        let (labels, ns) = match s.rfind('}') {
            Some(i) => (&s[..=i], s[i + 1..].trim()),
            None => return Err(format!("unclosed '{{' in {s:?}")),
        };
        let namespace = match ns.strip_prefix("in ") {
            Some(n) => n.trim().to_string(),
            None if ns.is_empty() => "default".to_string(),
            None => {
                return Err(format!(
                    "expected `in NAMESPACE` after the labels, found {ns:?}"
                ));
            }
        };
        return Ok(Party::Labels {
            labels: parse_labels(labels)?,
            namespace,
        });
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Party::Ip(ip));
    }
    if s.is_empty() || s.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?} is not NS/POD, an IP address or {{labels}} in NS"
        ));
    }
    Ok(Party::Pod(s.to_string()))
}

/// `from A to B on PORT[/PROTO]` (the key) and `allow`/`deny` (the value).
pub fn parse_expectation(key: &str, value: &str) -> Result<Expectation, String> {
    let rest = key
        .trim()
        .strip_prefix("from ")
        .ok_or("an expectation reads `from A to B on PORT[/PROTOCOL]: allow|deny`")?;
    let (from, rest) = rest
        .split_once(" to ")
        .ok_or("missing ` to ` in the expectation")?;
    let (to, port) = rest
        .rsplit_once(" on ")
        .ok_or("missing ` on PORT` in the expectation")?;
    let (p, proto) = match port.trim().split_once('/') {
        Some((p, pr)) => (
            p,
            Protocol::parse(pr).ok_or_else(|| format!("unknown protocol {pr:?}"))?,
        ),
        None => (port.trim(), Protocol::Tcp),
    };
    let port: u16 = p
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{p:?} is not a port number (1-65535)"))?;
    let allow = match value.trim().to_ascii_lowercase().as_str() {
        "allow" | "allowed" => true,
        "deny" | "denied" => false,
        other => return Err(format!("expected allow or deny, found {other:?}")),
    };
    Ok(Expectation {
        text: key.trim().to_string(),
        line: 0,
        from: parse_party(from)?,
        to: parse_party(to)?,
        port,
        protocol: proto,
        allow,
    })
}

/// The (1-based) line where `needle` first appears, for messages.
fn line_of(text: &str, needle: &str) -> usize {
    text.find(needle)
        .map(|i| text[..i].matches('\n').count() + 1)
        .unwrap_or(0)
}

struct Resolved<'a> {
    identity: Option<std::borrow::Cow<'a, Identity>>,
    ip: Option<IpAddr>,
    ports: &'a [NamedPort],
    node: Option<&'a Identity>,
    name: String,
}

fn resolve<'a>(cluster: &'a Cluster, p: &Party) -> Result<Resolved<'a>, String> {
    Ok(match p {
        Party::Pod(name) => {
            let w = cluster
                .find(name)
                .ok_or_else(|| format!("no pod {name:?} in the snapshot"))?;
            let e = cluster.endpoint(w);
            Resolved {
                identity: e.identity.map(std::borrow::Cow::Borrowed),
                ip: e.ip,
                ports: e.ports,
                node: e.node,
                name: w.display_name(),
            }
        }
        Party::Labels { labels, namespace } => {
            let empty = BTreeMap::new();
            let ns_labels = cluster
                .namespaces
                .get(namespace)
                .map(|n| &n.labels)
                .unwrap_or(&empty);
            Resolved {
                identity: Some(std::borrow::Cow::Owned(Identity::for_pod(
                    namespace, ns_labels, labels,
                ))),
                ip: None,
                ports: &[],
                node: None,
                name: format!("{labels:?} in {namespace}"),
            }
        }
        Party::Ip(ip) => Resolved {
            identity: None,
            ip: Some(*ip),
            ports: &[],
            node: cluster.ip_endpoint(*ip).node,
            name: ip.to_string(),
        },
    })
}

/// Load one test file and evaluate every expectation. `Err` is a problem
/// with the file itself (unreadable, bad YAML, bad expectation syntax,
/// policies that do not compile): reported with file and line.
pub fn run(path: &Path) -> Result<Report, String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
    let f: File = serde_saphyr::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut exps = Vec::new();
    let mut errors = Vec::new();
    for m in &f.expect {
        for (k, v) in m {
            let line = line_of(&text, k);
            match parse_expectation(k, v) {
                Ok(mut e) => {
                    e.line = line;
                    exps.push(e);
                }
                Err(msg) => errors.push(format!("{file}:{line}: {msg}")),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let cluster_paths = f.cluster.paths(base);
    let policy_paths = f.policies.paths(base);
    let mut all = cluster_paths.clone();
    all.extend(policy_paths);
    let specs = f
        .plugins
        .iter()
        .map(|(name, p)| match p {
            TestPlugin::File(w) => PluginSpec::from_files(name, &base.join(w), None, false),
            TestPlugin::Full {
                file: w,
                config,
                fail_open,
            } => PluginSpec::from_files(
                name,
                &base.join(w),
                config.as_ref().map(|c| base.join(c)).as_deref(),
                *fail_open,
            ),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{file}: {e}"))?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let loaded = if all.is_empty() {
        source::Loaded::default()
    } else {
        source::load_with(&all, &names).map_err(|d| format!("{file}: inputs:\n{d}"))?
    };
    let rs = match &f.ruleset {
        Some(r) => {
            if !loaded.policies.is_empty() || !specs.is_empty() {
                return Err(format!(
                    "{file}: give `ruleset` or policies (with plugins), not both"
                ));
            }
            let p = base.join(r);
            let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            Ruleset::decode(&bytes).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => {
            let mut rs = compile::compile(&loaded);
            plugins::embed(&mut rs, specs).map_err(|e| format!("{file}: {e}"))?;
            rs
        }
    };
    let mut cluster = loaded.cluster;
    let (plugins, warnings) =
        plugins::offline_view(&rs, &mut cluster).map_err(|e| format!("{file}: {e}"))?;
    for w in warnings {
        eprintln!("{file}: warning: {w}");
    }
    let ev = plugins::evaluator(&rs, plugins.as_ref());
    let cluster = &cluster;
    let outcomes = exps
        .into_iter()
        .map(|e| {
            let r = resolve(cluster, &e.from).and_then(|a| Ok((a, resolve(cluster, &e.to)?)));
            match r {
                Err(msg) => Outcome {
                    expectation: e,
                    result: Err(msg),
                    why: vec![],
                },
                Ok((a, b)) => {
                    let d = ev.evaluate(&Flow {
                        src: Endpoint {
                            identity: a.identity.as_deref(),
                            ip: a.ip,
                            ports: a.ports,
                            node: a.node,
                        },
                        dst: Endpoint {
                            identity: b.identity.as_deref(),
                            ip: b.ip,
                            ports: b.ports,
                            node: b.node,
                        },
                        port: e.port,
                        protocol: e.protocol,
                    });
                    Outcome {
                        why: explain::decision(&rs, &d, &a.name, &b.name),
                        result: Ok(d.allowed),
                        expectation: e,
                    }
                }
            }
        })
        .collect();
    Ok(Report { file, outcomes })
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML, one testsuite per file, one testcase per expectation.
pub fn junit(reports: &[Report]) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for r in reports {
        let failures = r.outcomes.iter().filter(|o| !o.passed()).count();
        s += &format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\">\n",
            xml(&r.file),
            r.outcomes.len()
        );
        for o in &r.outcomes {
            let e = &o.expectation;
            s += &format!(
                "    <testcase classname=\"{}\" name=\"{}: {}\"",
                xml(&r.file),
                xml(&e.text),
                if e.allow { "allow" } else { "deny" }
            );
            if o.passed() {
                s += "/>\n";
                continue;
            }
            let msg = match &o.result {
                Ok(a) => format!("expected {}, got {}", verdict(e.allow), verdict(*a)),
                Err(m) => m.clone(),
            };
            s += &format!(
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                xml(&msg),
                xml(&o.why.join("\n"))
            );
        }
        s += "  </testsuite>\n";
    }
    s += "</testsuites>\n";
    s
}

pub fn verdict(allowed: bool) -> &'static str {
    if allowed { "allow" } else { "deny" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectation_syntax() {
        let e = parse_expectation("from x/a to {app=web, tier: 1} in y on 80/UDP", "deny").unwrap();
        assert_eq!(e.from, Party::Pod("x/a".into()));
        assert_eq!(
            e.to,
            Party::Labels {
                labels: BTreeMap::from([("app".into(), "web".into()), ("tier".into(), "1".into())]),
                namespace: "y".into()
            }
        );
        assert_eq!((e.port, e.protocol, e.allow), (80, Protocol::Udp, false));
        let e = parse_expectation("from 10.0.0.1 to x/b on 443", "allow").unwrap();
        assert_eq!(e.from, Party::Ip("10.0.0.1".parse().unwrap()));
        for (k, v) in [
            ("x/a to y/b on 80", "allow"),
            ("from x/a y/b on 80", "allow"),
            ("from x/a to y/b", "allow"),
            ("from x/a to y/b on 0", "allow"),
            ("from x/a to y/b on 80/ICMP", "allow"),
            ("from x/a to y/b on 80", "maybe"),
            ("from {app=web to y/b on 80", "allow"),
            ("from {app} to y/b on 80", "allow"),
            ("from {app=a} at y to y/b on 80", "allow"),
        ] {
            assert!(parse_expectation(k, v).is_err(), "{k}: {v}");
        }
    }
}
