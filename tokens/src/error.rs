//! Why a token was refused. Each variant has a stable counter name so the
//! runtime can count drops by reason without string matching.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    #[error("token of {size} bytes exceeds the limit of {limit}")]
    Oversized { size: usize, limit: usize },
    #[error("token truncated")]
    Truncated,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported token version {0}")]
    Version(u8),
    #[error("unexpected token type {0}")]
    WrongType(u8),
    #[error("signature algorithm {0:?} is not accepted in this mode")]
    Algorithm(String),
    #[error("signature does not verify")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token is for another audience (trust domain)")]
    Audience,
    #[error("no verified key for issuer {0:?}")]
    UnknownIssuer(String),
    #[error("issuer's key does not chain to our CA: {0}")]
    Untrusted(String),
    #[error("nonce authentication failed")]
    Mac,
    #[error("nonce does not match the handshake")]
    NonceMismatch,
    #[error("replayed token")]
    Replay,
    #[error("invalid claims: {0}")]
    Claims(String),
}

impl TokenError {
    /// Metric label for drops caused by this error.
    pub fn counter(&self) -> &'static str {
        match self {
            TokenError::Oversized { .. } => "token_oversized",
            TokenError::Truncated => "token_truncated",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::Version(_) => "token_version",
            TokenError::WrongType(_) => "token_wrong_type",
            TokenError::Algorithm(_) => "token_algorithm",
            TokenError::Signature => "token_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::Audience => "token_audience",
            TokenError::UnknownIssuer(_) => "token_unknown_issuer",
            TokenError::Untrusted(_) => "token_untrusted",
            TokenError::Mac => "token_mac",
            TokenError::NonceMismatch => "token_nonce_mismatch",
            TokenError::Replay => "token_replay",
            TokenError::Claims(_) => "token_claims",
        }
    }
}

/// Problems with key material, found when loading configuration.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("pre-shared key is {0} bytes; at least 32 random bytes are required")]
    PskTooShort(usize),
    #[error("pre-shared key file must hold base64 of at least 32 random bytes: {0}")]
    PskEncoding(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}
