//! Decide hook: a deny-list of (from, to, ports) entries over identity
//! labels, configured by settings. Everything not listed is left to the
//! rules (abstain), so the hook can only take access away.

use serde::Deserialize;
use trireme_plugin_sdk::{Identities, Labels, Plugin, Query, Verdict, export_plugin};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Labels the source must have (all of them); empty matches anything,
    /// including endpoints that are not workloads.
    #[serde(default)]
    from: Labels,
    #[serde(default)]
    to: Labels,
    /// Empty: every port.
    #[serde(default)]
    ports: Vec<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    deny: Vec<Entry>,
}

#[derive(Default)]
pub struct DenyList {
    settings: Settings,
}

fn has_all(want: &Labels, ids: &Identities, id: u64) -> bool {
    want.is_empty()
        || ids
            .labels(id)
            .is_some_and(|l| want.iter().all(|(k, v)| l.get(k) == Some(v)))
}

impl Plugin for DenyList {
    fn init(&mut self, settings: &str) -> Result<(), String> {
        self.settings = serde_json::from_str(settings).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn decide(&mut self, q: &Query, ids: &Identities) -> Verdict {
        let hit = self.settings.deny.iter().any(|e| {
            (e.ports.is_empty() || e.ports.contains(&q.port))
                && has_all(&e.from, ids, q.src_id)
                && has_all(&e.to, ids, q.dst_id)
        });
        if hit { Verdict::Deny } else { Verdict::Abstain }
    }
}

export_plugin!(DenyList, name: "deny-list", version: "0.1.0", hooks: [decide]);
