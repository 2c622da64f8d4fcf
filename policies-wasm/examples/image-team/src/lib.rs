//! Resolver: a workload's team, from the `trireme.io/team` annotation or
//! else from its first image (`registry.example.com/<team>/<app>:tag`).
//! The C and AssemblyScript examples implement the same rules, so the three
//! are tested against the same cases.

use serde::Deserialize;
use trireme_plugin_sdk::{Labels, Plugin, Workload, export_plugin};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    /// Label to set.
    label: String,
    /// Annotation that names the team outright.
    annotation: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            label: "team".into(),
            annotation: "trireme.io/team".into(),
        }
    }
}

#[derive(Default)]
pub struct ImageTeam {
    settings: Settings,
}

impl Plugin for ImageTeam {
    fn init(&mut self, settings: &str) -> Result<(), String> {
        self.settings = serde_json::from_str(settings).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn resolve(&mut self, w: &Workload) -> Result<Labels, String> {
        let team = w
            .annotations
            .get(&self.settings.annotation)
            .map(String::as_str)
            .or_else(|| w.images.first().and_then(|i| team_of_image(i)))
            .filter(|t| valid_label_value(t));
        Ok(team
            .map(|t| Labels::from([(self.settings.label.clone(), t.to_string())]))
            .unwrap_or_default())
    }
}

/// `[registry/]team/app[:tag][@digest]` → team. A first segment with a dot
/// or a port, or `localhost`, is a registry.
pub fn team_of_image(image: &str) -> Option<&str> {
    let image = image.split('@').next().unwrap_or(image);
    let mut segs: Vec<&str> = image.split('/').collect();
    if segs.len() > 1 && (segs[0].contains('.') || segs[0].contains(':') || segs[0] == "localhost")
    {
        segs.remove(0);
    }
    (segs.len() >= 2).then_some(segs[0])
}

/// Kubernetes label value: up to 63 of [A-Za-z0-9-_.], alphanumeric at both ends.
pub fn valid_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

export_plugin!(ImageTeam, name: "image-team", version: "0.1.0", hooks: [resolve]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images() {
        assert_eq!(
            team_of_image("registry.example.com/payments/api:1.2"),
            Some("payments")
        );
        assert_eq!(
            team_of_image("localhost:5000/web/site@sha256:00"),
            Some("web")
        );
        assert_eq!(team_of_image("payments/api"), Some("payments"));
        assert_eq!(team_of_image("nginx:1.25"), None);
        assert_eq!(team_of_image("quay.io/nginx"), None);
    }
}
