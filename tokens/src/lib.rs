//! Trireme identity tokens: what rides on SYN, SYN-ACK and ACK, how it is
//! signed (PSK or PKI), verified, cached and protected against replay.
//!
//! No networking here; the runtime's enforcer calls [`Engine`] with packet
//! payloads. The wire format is documented in docs/wire-format.md.

pub mod cache;
pub mod claims;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod keys;
pub mod pki;
pub mod wire;

pub use error::{KeyError, TokenError};
pub use handshake::{
    AwaitAck, Config, Credentials, Engine, LocalToken, Peer, PeerView, PkiCredentials, SynReceived,
    SynSent,
};
pub use keys::{Ca, NodeKey, Psk, VerifiedKey};
