//! `trireme plugin inspect` and `trireme plugin test`: a plugin on its own,
//! against recorded inputs, before it goes into a ruleset.
//!
//! ```yaml
//! settings: {deny: [{to: {team: payments}, ports: [23]}]}   # optional
//! cases:
//! - name: team from the image
//!   resolve: {name: api, namespace: shop, images: [registry.example.com/payments/api:1]}
//!   expect: {team: payments}          # labels ({} for none), or `error`
//! - name: telnet to payments is denied
//!   decide: {from: {team: web}, to: {team: payments}, port: 23}
//!   expect: deny                      # allow, deny, abstain or error
//! ```

use crate::model::Protocol;
use crate::plugins::protocol_number;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use trireme_plugin_host::{
    Host, Labels, Limits, Plugin, Query, QueryDirection, Workload, abi, hex,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    settings: Option<serde_json::Value>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    resolve: Option<ResolveInput>,
    #[serde(default)]
    decide: Option<DecideInput>,
    expect: Expect,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ResolveInput {
    kind: Option<String>,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    namespace_labels: BTreeMap<String, String>,
    images: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DecideInput {
    /// Labels of the source; absent: not a workload.
    #[serde(default)]
    from: Option<BTreeMap<String, String>>,
    #[serde(default)]
    to: Option<BTreeMap<String, String>>,
    #[serde(default)]
    from_ip: Option<IpAddr>,
    #[serde(default)]
    to_ip: Option<IpAddr>,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    /// `ingress` (default) or `egress`.
    #[serde(default)]
    direction: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Expect {
    Word(String),
    Labels(BTreeMap<String, String>),
}

pub struct CaseResult {
    pub name: String,
    /// What the plugin answered.
    pub got: String,
    /// `None`: passed.
    pub failure: Option<String>,
}

pub struct Report {
    pub cases: Vec<CaseResult>,
}

fn load(wasm: &Path, settings: Option<&str>) -> Result<Plugin, String> {
    let bytes = std::fs::read(wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
    let name = wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_string();
    let host = Host::new(Limits::offline())?;
    host.load(&name, &bytes, None, settings)
        .map_err(|e| e.to_string())
}

pub fn inspect(wasm: &Path) -> Result<String, String> {
    let p = load(wasm, None)?;
    let h = p.hooks();
    let mut out = format!(
        "{}: valid ABI v1 plugin, {} bytes, sha256:{}\n",
        wasm.display(),
        p.size(),
        hex(&p.sha256())
    );
    let hooks: Vec<&str> = [
        (h.resolve, "resolve"),
        (h.decide, "decide"),
        (h.init, "init (takes settings)"),
        (h.identity, "identity (receives identity labels)"),
    ]
    .into_iter()
    .filter_map(|(on, n)| on.then_some(n))
    .collect();
    out += &format!("  exports: {}\n", hooks.join(", "));
    match p.metadata() {
        Some(m) => {
            out += &format!("  name: {}\n  version: {}\n", m.name, m.version);
            if !m.description.is_empty() {
                out += &format!("  description: {}\n", m.description);
            }
        }
        None => out += "  no trireme.plugin metadata section\n",
    }
    Ok(out)
}

pub fn run(wasm: &Path, cases: &Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(cases).map_err(|e| format!("{}: {e}", cases.display()))?;
    let file: File =
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", cases.display()))?;
    let settings = file.settings.as_ref().map(|v| v.to_string());
    let plugin = load(wasm, settings.as_deref())?;
    let mut out = Vec::new();
    for c in file.cases {
        let at = |m: String| format!("{}: case {:?}: {m}", cases.display(), c.name);
        let (got, failure) = match (&c.resolve, &c.decide) {
            (Some(r), None) => resolve_case(&plugin, r, &c.expect).map_err(at)?,
            (None, Some(d)) => decide_case(&plugin, d, &c.expect).map_err(at)?,
            _ => return Err(at("give exactly one of `resolve` and `decide`".into())),
        };
        out.push(CaseResult {
            name: c.name,
            got,
            failure,
        });
    }
    Ok(Report { cases: out })
}

fn labels_text(l: &Labels) -> String {
    abi::labels_json(l)
}

fn resolve_case(
    p: &Plugin,
    r: &ResolveInput,
    expect: &Expect,
) -> Result<(String, Option<String>), String> {
    let w = Workload {
        kind: r.kind.clone().unwrap_or_else(|| "pod".into()),
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        labels: r.labels.clone(),
        annotations: r.annotations.clone(),
        namespace_labels: r.namespace_labels.clone(),
        images: r.images.clone(),
    };
    let got = p.resolve(&w.to_json());
    let shown = match &got {
        Ok(l) => labels_text(l),
        Err(e) => format!("error: {e}"),
    };
    let failure = match expect {
        Expect::Word(w) if w != "error" => {
            return Err(format!(
                "expect for resolve is a map of labels or `error`, not {w:?}"
            ));
        }
        Expect::Word(_) => got
            .as_ref()
            .ok()
            .map(|l| format!("expected an error, got {}", labels_text(l))),
        Expect::Labels(want) => match &got {
            Ok(l) if l == want => None,
            _ => Some(format!("expected {}, got {shown}", labels_text(want))),
        },
    };
    Ok((shown, failure))
}

fn decide_case(
    p: &Plugin,
    d: &DecideInput,
    expect: &Expect,
) -> Result<(String, Option<String>), String> {
    let protocol = match &d.protocol {
        None => Protocol::Tcp,
        Some(s) => Protocol::parse(s).ok_or_else(|| format!("unknown protocol {s:?}"))?,
    };
    let direction = match d.direction.as_deref() {
        None | Some("ingress") => QueryDirection::Ingress,
        Some("egress") => QueryDirection::Egress,
        Some(o) => return Err(format!("direction {o:?}: ingress or egress")),
    };
    // Each side's id and labels JSON, as the host announces them.
    let side = |l: &Option<BTreeMap<String, String>>| {
        l.as_ref().map_or((0, None), |l| {
            let id = abi::identity_id(l.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            (id, Some(abi::labels_json(l)))
        })
    };
    let (from, to) = (side(&d.from), side(&d.to));
    let q = Query {
        src_id: from.0,
        dst_id: to.0,
        src_ip: d.from_ip,
        dst_ip: d.to_ip,
        port: d.port,
        protocol: protocol_number(protocol),
        direction,
    };
    let mut labels_of = |n: u64| {
        [&from, &to]
            .into_iter()
            .find(|(id, _)| *id == n)
            .and_then(|(_, json)| json.clone())
    };
    let got = p.decide(&q, &mut labels_of);
    let shown = match &got {
        Ok(v) => v.as_str().to_string(),
        Err(e) => format!("error: {e}"),
    };
    let want = match expect {
        Expect::Word(w) if ["allow", "deny", "abstain", "error"].contains(&w.as_str()) => w,
        _ => return Err("expect for decide is allow, deny, abstain or error".into()),
    };
    let ok = match &got {
        Ok(v) => v.as_str() == want,
        Err(_) => want == "error",
    };
    Ok((
        shown.clone(),
        (!ok).then(|| format!("expected {want}, got {shown}")),
    ))
}
