//! What a JWT says, and the checks we make ourselves.
//!
//! jsonwebtoken verifies signatures; times and audience are checked here,
//! against an injected clock with an explicit skew, so tests can move time
//! and the runtime can configure tolerance.

use crate::error::TokenError;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most labels a token may carry.
pub const MAX_LABELS: usize = 64;

/// Claims of an identity token (SYN and SYN-ACK). Short names keep the
/// token small; `l` is the label set as `k=v,k=v` in key order, which is
/// smaller than a JSON object and just as readable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityClaims {
    pub iss: String,
    pub aud: String,
    pub nbf: u64,
    pub exp: u64,
    pub l: String,
}

/// Claims of a key token: the CA vouches that `sub` owns public key `k`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyClaims {
    pub sub: String,
    pub aud: String,
    pub nbf: u64,
    pub exp: u64,
    /// Uncompressed P-256 point, base64url.
    pub k: String,
}

/// Kubernetes guarantees that a namespace's `kubernetes.io/metadata.name`
/// label equals its name, so a token omits it when it equals `@namespace`
/// and the receiver restores it: 40 bytes saved on every Kubernetes token.
const NS_KEY: &str = "@namespace";
const NS_NAME_KEY: &str = "@ns:kubernetes.io/metadata.name";

pub fn encode_labels(labels: &BTreeMap<String, String>) -> Result<String, TokenError> {
    if labels.len() > MAX_LABELS {
        return Err(TokenError::Claims(format!(
            "{} labels (at most {MAX_LABELS})",
            labels.len()
        )));
    }
    let mut s = String::new();
    for (k, v) in labels {
        if k.is_empty() || k.contains([',', '=']) || v.contains([',', '=']) {
            return Err(TokenError::Claims(format!(
                "label {k:?}={v:?} cannot be carried (empty key, or ',' / '=')"
            )));
        }
        if k == NS_NAME_KEY && labels.get(NS_KEY) == Some(v) {
            continue;
        }
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    Ok(s)
}

pub fn decode_labels(s: &str) -> Result<BTreeMap<String, String>, TokenError> {
    let mut out = BTreeMap::new();
    if s.is_empty() {
        return Ok(out);
    }
    for (i, kv) in s.split(',').enumerate() {
        if i >= MAX_LABELS {
            return Err(TokenError::Claims("too many labels".into()));
        }
        let Some((k, v)) = kv.split_once('=') else {
            return Err(TokenError::Claims(format!("label {kv:?} has no '='")));
        };
        if k.is_empty() {
            return Err(TokenError::Claims("empty label key".into()));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(TokenError::Claims(format!("label {k:?} repeated")));
        }
    }
    if let Some(ns) = out.get(NS_KEY).cloned() {
        if out.get(NS_NAME_KEY).is_some_and(|v| *v == ns) {
            return Err(TokenError::Claims(format!("{NS_NAME_KEY} must be omitted")));
        }
        out.entry(NS_NAME_KEY.to_string()).or_insert(ns);
    }
    Ok(out)
}

/// Validity window check with skew tolerance.
pub fn check_times(nbf: u64, exp: u64, now: u64, skew: u64) -> Result<(), TokenError> {
    if now > exp.saturating_add(skew) {
        return Err(TokenError::Expired);
    }
    if now.saturating_add(skew) < nbf {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

/// The `alg` of a compact JWS, read before any key is chosen so that
/// `none` and algorithm confusion are refused by name.
pub fn header_alg(jwt: &str) -> Result<String, TokenError> {
    let head = jwt.split('.').next().unwrap_or_default();
    let bytes = B64
        .decode(head)
        .map_err(|_| TokenError::Malformed("JWT header is not base64url"))?;
    #[derive(Deserialize)]
    struct Head {
        alg: String,
    }
    let h: Head =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed("JWT header"))?;
    Ok(h.alg)
}

/// The claims of a JWS *without* verifying it: only to pick the key that
/// will verify it. Nothing read here is trusted.
pub fn unverified_claims<T: for<'de> Deserialize<'de>>(jwt: &str) -> Result<T, TokenError> {
    let mut parts = jwt.split('.');
    let (Some(_), Some(body), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("JWT must have three parts"));
    };
    let bytes = B64
        .decode(body)
        .map_err(|_| TokenError::Malformed("JWT payload is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Claims(e.to_string()))
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn unb64(s: &str) -> Result<Vec<u8>, TokenError> {
    B64.decode(s)
        .map_err(|_| TokenError::Malformed("base64url field"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_reject() {
        let mut m = BTreeMap::new();
        m.insert("app".to_string(), "web".to_string());
        m.insert(
            "@ns:kubernetes.io/metadata.name".to_string(),
            "x".to_string(),
        );
        m.insert("empty".to_string(), String::new());
        let s = encode_labels(&m).unwrap();
        assert_eq!(decode_labels(&s).unwrap(), m);
        // The namespace name label rides implicitly with @namespace.
        m.insert(NS_KEY.into(), "x".into());
        let s = encode_labels(&m).unwrap();
        assert!(!s.contains("metadata.name"), "{s}");
        assert_eq!(decode_labels(&s).unwrap(), m);
        assert!(decode_labels("@namespace=x,@ns:kubernetes.io/metadata.name=x").is_err());
        m.remove(NS_KEY);
        assert!(decode_labels("a=1,a=2").is_err());
        assert!(decode_labels("a").is_err());
        assert!(decode_labels("=1").is_err());
        m.insert("bad".into(), "x,y".into());
        assert!(encode_labels(&m).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(check_times(100, 200, 250, 30), Err(TokenError::Expired));
        assert_eq!(check_times(100, 200, 60, 30), Err(TokenError::NotYetValid));
        assert!(check_times(100, 200, 229, 30).is_ok());
        assert!(check_times(100, 200, 71, 30).is_ok());
    }
}
