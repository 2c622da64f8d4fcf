//! The compiled ruleset: the portable artifact between the compiler and the
//! node runtime (format in docs/ruleset-format.md).
//!
//! Layout: 8-byte magic, u16 major, u16 minor, u64 body length, 32-byte
//! SHA-256 of the body, then the body (postcard). Everything is sorted before
//! encoding, so equal inputs give equal bytes in any input order. A reader
//! refuses a newer major version rather than misreading it.

use crate::model::{Policy, Requirement};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

pub const MAGIC: &[u8; 8] = b"TRIREME\x00";
/// The newest major version this build reads and writes. A ruleset is
/// written in the oldest version that can hold it: 1.0 without plugins
/// (byte for byte what 1.x builds wrote), 2.0 with plugins or `ask` rules,
/// which a 1.x reader must refuse rather than silently skip, 3.0 with
/// `nodes` peers (a peer kind older readers cannot decode).
pub const FORMAT_MAJOR: u16 = 3;
pub const FORMAT_MINOR: u16 = 0;
/// The oldest major version this build reads.
pub const FORMAT_MAJOR_MIN: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 2 + 8 + 32;
/// Upper bound on a body we are willing to decode (sanity, not a tuning knob).
pub const MAX_BODY: u64 = 1 << 31;

/// A WebAssembly plugin carried by the ruleset (docs/plugin-abi.md),
/// pinned by its sha256. Sorted by name: `Action::Ask` indexes this table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Plugin {
    pub name: String,
    pub sha256: [u8; 32],
    pub wasm: Vec<u8>,
    /// JSON handed to the plugin's `trireme_init`.
    pub settings: Option<String>,
    /// On a plugin failure: abstain / keep the workload's own labels,
    /// instead of denying. Unsafe; the node logs it at start.
    pub fail_open: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ruleset {
    /// Source files (as given on the command line), sorted.
    pub sources: Vec<String>,
    /// Sorted by tier, priority, then name: the evaluation order.
    pub policies: Vec<Policy>,
    /// Every label key any selector reads, sorted: the runtime puts only
    /// these into identity tokens.
    pub label_keys: Vec<String>,
    pub plugins: Vec<Plugin>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesetError {
    #[error("not a trireme ruleset (bad magic header)")]
    BadMagic,
    #[error(
        "ruleset format {major}.{minor} is newer than this build supports ({FORMAT_MAJOR}.x); upgrade trireme"
    )]
    NewerVersion { major: u16, minor: u16 },
    #[error(
        "ruleset format {major}.{minor} is too old for this build ({FORMAT_MAJOR}.x); recompile the policies"
    )]
    OlderVersion { major: u16, minor: u16 },
    #[error("ruleset is truncated ({have} bytes, expected {want})")]
    Truncated { have: u64, want: u64 },
    #[error("ruleset has {0} trailing bytes after its body")]
    Trailing(u64),
    #[error("ruleset is corrupted: content hash mismatch")]
    HashMismatch,
    #[error("ruleset is corrupted: {0}")]
    Decode(String),
}

impl Ruleset {
    /// Builds a ruleset in canonical order.
    /// `sources` must already be sorted: `SourceRef::file` indexes it.
    pub fn new(sources: Vec<String>, mut policies: Vec<Policy>) -> Self {
        debug_assert!(sources.is_sorted());
        policies.sort();
        let keys: BTreeSet<&str> = policies
            .iter()
            .flat_map(|p| p.selectors())
            .flat_map(|s| s.requirements.iter().map(|r: &Requirement| r.key.as_str()))
            .collect();
        Ruleset {
            sources,
            label_keys: keys.into_iter().map(String::from).collect(),
            policies,
            plugins: Vec::new(),
        }
    }

    /// The version this ruleset is written in (see `FORMAT_MAJOR`).
    pub fn format_version(&self) -> (u16, u16) {
        if self.uses_node_peers() {
            (3, 0)
        } else if self.uses_plugins() {
            (2, 0)
        } else {
            (1, 0)
        }
    }

    /// Whether any rule has a `nodes` peer (which a node can only honour
    /// with its cluster's node addresses configured).
    pub fn uses_node_peers(&self) -> bool {
        self.policies
            .iter()
            .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten())
            .any(|r| match &r.peers {
                crate::model::Peers::AnyOf(list) => list
                    .iter()
                    .any(|p| matches!(p, crate::model::Peer::Nodes(_))),
                crate::model::Peers::Any => false,
            })
    }

    fn uses_plugins(&self) -> bool {
        !self.plugins.is_empty()
            || self.policies.iter().any(|p| {
                p.ingress
                    .iter()
                    .chain(p.egress.iter())
                    .flatten()
                    .any(|r| matches!(r.action, crate::model::Action::Ask(_)))
            })
    }

    fn body(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to memory cannot fail")
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = self.body();
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        let (major, minor) = self.format_version();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&major.to_le_bytes());
        out.extend_from_slice(&minor.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&body));
        out.extend_from_slice(&body);
        out
    }

    /// SHA-256 of the encoded body, hex: names a ruleset in logs and diffs.
    pub fn content_hash(&self) -> String {
        hex(&Sha256::digest(self.body()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Ruleset, RulesetError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(RulesetError::BadMagic);
        }
        if bytes.len() < HEADER_LEN {
            return Err(RulesetError::Truncated {
                have: bytes.len() as u64,
                want: HEADER_LEN as u64,
            });
        }
        let major = u16::from_le_bytes([bytes[8], bytes[9]]);
        let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
        if major > FORMAT_MAJOR {
            return Err(RulesetError::NewerVersion { major, minor });
        }
        if major < FORMAT_MAJOR_MIN {
            return Err(RulesetError::OlderVersion { major, minor });
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let have = (bytes.len() - HEADER_LEN) as u64;
        if len > MAX_BODY || have < len {
            return Err(RulesetError::Truncated {
                have: bytes.len() as u64,
                want: HEADER_LEN as u64 + len,
            });
        }
        if have > len {
            return Err(RulesetError::Trailing(have - len));
        }
        let body = &bytes[HEADER_LEN..];
        if Sha256::digest(body).as_slice() != &bytes[20..52] {
            return Err(RulesetError::HashMismatch);
        }
        let rs: Ruleset =
            postcard::from_bytes(body).map_err(|e| RulesetError::Decode(e.to_string()))?;
        rs.check_invariants().map_err(RulesetError::Decode)?;
        if rs.format_version().0 != major {
            return Err(RulesetError::Decode(format!(
                "labelled format {major}.{minor} but its content needs {}.x",
                rs.format_version().0
            )));
        }
        Ok(rs)
    }

    /// A ruleset written by hand or by a buggy writer must not make the
    /// evaluator index out of bounds.
    fn check_invariants(&self) -> Result<(), String> {
        let n = self.sources.len() as u32;
        for p in &self.policies {
            let bad = p.source.file >= n && n > 0
                || p.ingress
                    .iter()
                    .chain(p.egress.iter())
                    .flatten()
                    .any(|r| r.source.file >= n && n > 0);
            if bad {
                return Err(format!("policy {} refers to a missing source file", p.name));
            }
        }
        if !self.policies.is_sorted() {
            return Err("policies are not in canonical order".into());
        }
        if !self.plugins.windows(2).all(|w| w[0].name < w[1].name) {
            return Err("plugins are not sorted by unique name".into());
        }
        for p in &self.plugins {
            if <[u8; 32]>::from(Sha256::digest(&p.wasm)) != p.sha256 {
                return Err(format!(
                    "plugin {}: module does not match its sha256",
                    p.name
                ));
            }
        }
        let n = self.plugins.len() as u32;
        for p in &self.policies {
            let rules = p.ingress.iter().chain(p.egress.iter()).flatten();
            if rules
                .into_iter()
                .any(|r| matches!(r.action, crate::model::Action::Ask(k) if k >= n))
            {
                return Err(format!(
                    "policy {} asks a plugin missing from the ruleset",
                    p.name
                ));
            }
        }
        Ok(())
    }

    pub fn rule_count(&self) -> usize {
        self.policies
            .iter()
            .map(|p| p.ingress.as_ref().map_or(0, Vec::len) + p.egress.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
