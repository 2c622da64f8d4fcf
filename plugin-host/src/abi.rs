//! ABI v1 (docs/plugin-abi.md): the names, signatures and byte layouts a
//! guest and the host agree on. Kept in one place so the validator, the
//! caller and the documentation cannot drift apart.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

pub const ABI_VERSION: i32 = 1;

pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_ABI_VERSION: &str = "trireme_abi_version";
pub const EXPORT_ALLOC: &str = "trireme_alloc";
pub const EXPORT_FREE: &str = "trireme_free";
pub const EXPORT_INIT: &str = "trireme_init";
pub const EXPORT_RESOLVE: &str = "trireme_resolve";
pub const EXPORT_DECIDE: &str = "trireme_decide";
pub const EXPORT_IDENTITY: &str = "trireme_identity";

/// The one import a guest may have.
pub const IMPORT_MODULE: &str = "trireme";
pub const IMPORT_LOG: &str = "log";

/// Custom section holding the plugin's metadata (JSON).
pub const METADATA_SECTION: &str = "trireme.plugin";

/// Size of the `decide` query struct.
pub const QUERY_LEN: usize = 64;

/// What a `decide` hook answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// No opinion: evaluation continues as if the asking rule did not match.
    Abstain,
    Allow,
    Deny,
}

impl Verdict {
    pub fn from_code(code: i32) -> Option<Verdict> {
        match code {
            0 => Some(Verdict::Abstain),
            1 => Some(Verdict::Allow),
            2 => Some(Verdict::Deny),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Abstain => "abstain",
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// Which side of the connection is deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryDirection {
    /// The destination's ingress rules asked.
    Ingress = 0,
    /// The source's egress rules asked.
    Egress = 1,
}

/// A `decide` question. Identity ids are [`identity_id`]s; 0 means the
/// endpoint is not a workload (known only by its address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Query {
    pub src_id: u64,
    pub dst_id: u64,
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    pub port: u16,
    /// IANA protocol number: 6 TCP, 17 UDP, 132 SCTP.
    pub protocol: u8,
    pub direction: QueryDirection,
}

impl Query {
    /// The little-endian wire form: 0 src_id u64, 8 dst_id u64, 16 src_ip
    /// [16] (IPv4-mapped IPv6, zero if unknown), 32 dst_ip [16], 48 port u16,
    /// 50 protocol u8, 51 direction u8, 52..64 reserved zero.
    pub fn encode(&self) -> [u8; QUERY_LEN] {
        let mut b = [0u8; QUERY_LEN];
        b[0..8].copy_from_slice(&self.src_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_id.to_le_bytes());
        b[16..32].copy_from_slice(&ip16(self.src_ip));
        b[32..48].copy_from_slice(&ip16(self.dst_ip));
        b[48..50].copy_from_slice(&self.port.to_le_bytes());
        b[50] = self.protocol;
        b[51] = self.direction as u8;
        b
    }
}

fn ip16(ip: Option<IpAddr>) -> [u8; 16] {
    match ip {
        None => [0; 16],
        Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
        Some(IpAddr::V6(v6)) => v6.octets(),
    }
}

/// Decodes the 16-byte address field (for tests and the SDK's mirror).
pub fn ip_from16(b: [u8; 16]) -> Option<IpAddr> {
    if b == [0; 16] {
        return None;
    }
    let v6 = Ipv6Addr::from(b);
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// A stable 64-bit name for a label set: the same labels give the same id in
/// every process and on every node, so a plugin's answers (and our memo of
/// them) mean the same thing everywhere. Never 0 (0 is "not a workload").
pub fn identity_id<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    let mut h = Sha256::new();
    for (k, v) in labels {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        h.update((k.len() as u32).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u32).to_le_bytes());
        h.update(v.as_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")).max(1)
}

/// Labels as the JSON object the guest sees (keys sorted).
pub fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).expect("string map serializes")
}

/// `resolve`'s input: what the host knows about a workload. Maps are sorted
/// and the JSON is compact, so equal workloads give equal bytes (and hit
/// the memo).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// `pod`, `container` or `netns`.
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    /// Container images, in declaration order.
    pub images: Vec<String>,
}

impl Workload {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }
}

/// Metadata a plugin may carry in its `trireme.plugin` custom section.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub version: String,
    pub abi: i32,
    #[serde(default)]
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_layout_is_fixed() {
        let q = Query {
            src_id: 0x0102030405060708,
            dst_id: 9,
            src_ip: Some("198.18.0.1".parse().unwrap()),
            dst_ip: Some("fd00::2".parse().unwrap()),
            port: 8080,
            protocol: 6,
            direction: QueryDirection::Egress,
        };
        let b = q.encode();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b[8], 9);
        assert_eq!(&b[16..28], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&b[28..32], &[198, 18, 0, 1]);
        assert_eq!(ip_from16(b[32..48].try_into().unwrap()), q.dst_ip);
        assert_eq!(u16::from_le_bytes([b[48], b[49]]), 8080);
        assert_eq!((b[50], b[51]), (6, 1));
        assert!(b[52..].iter().all(|&x| x == 0));
    }

    #[test]
    fn identity_ids_are_stable_and_nonzero() {
        let a = identity_id([("app", "a"), ("team", "x")]);
        assert_eq!(a, identity_id([("app", "a"), ("team", "x")]));
        assert_ne!(a, identity_id([("app", "ateam"), ("", "x")]));
        assert_ne!(a, 0);
    }
}
