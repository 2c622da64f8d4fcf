//! The three-token handshake (design.md §4), with no networking: the
//! enforcer feeds packet payloads in and gets verdicts and payloads out.
//!
//! Costs per connection are kept off the signature path: a PU's identity
//! JWT is signed once and reused until it nears expiry; a peer's JWT is
//! verified once and its claims cached by its text; the per-connection
//! nonces are authenticated with HMAC-SHA256 under a key shared by the pair
//! (derived from the PSK, or by ECDH between the two node keys in PKI mode).

use crate::cache::{Bounded, ReplayGuard};
use crate::claims::{
    IdentityClaims, check_times, decode_labels, encode_labels, header_alg, unverified_claims,
};
use crate::error::{KeyError, TokenError};
use crate::keys::{Ca, NodeKey, Psk, VerifiedKey, derive, jwt_error};
use crate::wire::{self, FLAG_KEY_TOKEN, FLAG_SYN_MAC, Kind, MAC, NONCE};
use aws_lc_rs::{agreement, digest, hmac, rand};
use jsonwebtoken::{Algorithm, Header, Validation};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name: the `iss` of its tokens (and its certificate CN).
    pub node_id: String,
    /// Trust domain: the `aud` of every token; tokens for another are refused.
    pub audience: String,
    /// Lifetime of an identity JWT, seconds.
    pub token_ttl: u64,
    /// Re-sign when less than this remains, seconds.
    pub refresh_before: u64,
    /// Clock skew tolerated on nbf/exp, seconds.
    pub skew: u64,
    /// Label keys carried in tokens (those the ruleset reads); `None`: all.
    pub label_keys: Option<BTreeSet<String>>,
    /// Bound on cached verified tokens and peer keys.
    pub cache_entries: usize,
    /// SYN nonces remembered for replay detection: count and seconds.
    pub replay_entries: usize,
    pub replay_window: u64,
    /// PKI: refuse SYNs whose nonce is not MAC-authenticated (a first contact
    /// with a peer node cannot MAC its nonce; see docs/wire-format.md).
    pub require_syn_mac: bool,
}

impl Config {
    pub fn new(node_id: &str, audience: &str) -> Config {
        Config {
            node_id: node_id.to_string(),
            audience: audience.to_string(),
            token_ttl: 3600,
            refresh_before: 900,
            skew: 30,
            label_keys: None,
            cache_entries: 4096,
            replay_entries: 65536,
            replay_window: 120,
            require_syn_mac: false,
        }
    }
}

/// Key material and trust for one mode.
pub enum Credentials {
    Psk(Box<Psk>),
    Pki(Box<PkiCredentials>),
}

pub struct PkiCredentials {
    pub key: NodeKey,
    pub ca: Ca,
    /// Our CA-signed key token, sent with our JWTs so peers without our
    /// certificate can verify us.
    pub key_token: Option<String>,
    /// Pre-distributed peer certificates, already verified.
    pub peers: Vec<VerifiedKey>,
}

/// A verified JWT's peer and digest.
type Verified = (Arc<Peer>, [u8; 32]);

/// A verified peer identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub not_before: u64,
    /// min(token expiry, signer key expiry).
    pub expires: u64,
    /// The embedder's own view of these labels, built once per verified
    /// token (the engine caches `Peer`s by token) instead of once per
    /// connection.
    pub view: PeerView,
}

/// A slot for one value of the embedder's type, set at most once. Not part
/// of the identity: equality and debug output ignore it.
#[derive(Clone, Default)]
pub struct PeerView(std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl PeerView {
    /// The value, built by `make` on first use; `None` if an earlier call
    /// stored a value of another type.
    pub fn get_or_init<T: std::any::Any + Send + Sync>(
        &self,
        make: impl FnOnce() -> T,
    ) -> Option<&T> {
        self.0.get_or_init(|| Arc::new(make())).downcast_ref()
    }
}

impl std::fmt::Debug for PeerView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerView")
    }
}

impl PartialEq for PeerView {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PeerView {}

/// A PU's signed identity, reused across connections until refresh time.
#[derive(Debug, Clone)]
pub struct LocalToken {
    jwt: Arc<str>,
    digest: [u8; 32],
    refresh_at: u64,
}

impl LocalToken {
    pub fn jwt(&self) -> &str {
        &self.jwt
    }
    pub fn needs_refresh(&self, now: u64) -> bool {
        now >= self.refresh_at
    }
}

/// Initiator state between SYN and SYN-ACK.
#[derive(Debug, Clone)]
pub struct SynSent {
    nonce: [u8; NONCE],
}

/// Responder state between SYN and SYN-ACK.
#[derive(Clone)]
pub struct SynReceived {
    nonce: [u8; NONCE],
    pub peer: Arc<Peer>,
    key: Arc<hmac::Key>,
}

/// Responder state between SYN-ACK and ACK.
#[derive(Clone)]
pub struct AwaitAck {
    nonces: [[u8; NONCE]; 2],
    key: Arc<hmac::Key>,
    pub peer: Arc<Peer>,
    completed: bool,
}

/// A pairwise MAC key and the peer public key it was derived from.
type PairKey = (Vec<u8>, Arc<hmac::Key>);

pub struct Engine {
    cfg: Config,
    creds: Credentials,
    /// Verified JWTs by their text, with their digest (the MACs cover it).
    /// Keyed by the text, not the digest: a SHA-256 per SYN and SYN-ACK to
    /// find the entry cost about 0.6 µs each in a live runtime, and only a
    /// verified token is ever inserted.
    verified: Mutex<Bounded<Arc<str>, Verified>>,
    keys: Mutex<Bounded<String, VerifiedKey>>,
    /// Peer node → (the public key it was derived from, pairwise MAC key).
    pairs: Mutex<Bounded<String, PairKey>>,
    replay: Mutex<ReplayGuard>,
    psk_mac: Option<Arc<hmac::Key>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a cache lock cannot leave it inconsistent in a
    // way that matters (caches only save work), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn nonce() -> [u8; NONCE] {
    NONCES.with(|p| p.borrow_mut().take())
}

/// Nonces come from a per-thread pool of DRBG output, refilled a page at a
/// time. One 16-byte draw per handshake cost 3–4 µs in a live runtime (the
/// DRBG's thread state, its uniqueness check and a fresh AES key schedule,
/// all cold after each wake-up) against 0.1 µs warm; a page spreads that
/// over 256 nonces. The bytes are the same CSPRNG's, each used once, so a
/// nonce is as unpredictable as a draw of its own.
struct NoncePool {
    buf: [u8; POOL],
    next: usize,
}

const POOL: usize = 4096;

impl NoncePool {
    fn refill_if_empty(&mut self) {
        if self.next + NONCE > POOL {
            // The system CSPRNG; failure is unrecoverable for a security tool.
            rand::fill(&mut self.buf).expect("system random number generator failed");
            self.next = 0;
        }
    }

    fn take(&mut self) -> [u8; NONCE] {
        self.refill_if_empty();
        let mut n = [0u8; NONCE];
        n.copy_from_slice(&self.buf[self.next..self.next + NONCE]);
        self.next += NONCE;
        n
    }
}

thread_local! {
    static NONCES: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool { buf: [0; POOL], next: POOL })
    };
}

/// Fill this thread's nonce pool now, so that its first handshake does not
/// pay for it. The first draw in a process also seeds the DRBG, which
/// gathers CPU-jitter entropy (about 30 ms here): a node's queue threads
/// call this before the node reports ready.
pub fn prepare_thread() {
    NONCES.with(|p| p.borrow_mut().refill_if_empty());
}

fn mac(key: &hmac::Key, prefix: &[u8], digest: Option<&[u8; 32]>) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(prefix);
    if let Some(d) = digest {
        ctx.update(d);
    }
    ctx.sign()
}

fn check_mac(
    key: &hmac::Key,
    prefix: &[u8],
    digest: Option<&[u8; 32]>,
    got: &[u8; MAC],
) -> Result<(), TokenError> {
    let tag = mac(key, prefix, digest);
    // Constant-time comparison of the truncated tag.
    if aws_lc_rs::constant_time::verify_slices_are_equal(&tag.as_ref()[..MAC], got).is_ok() {
        Ok(())
    } else {
        Err(TokenError::Mac)
    }
}

impl Engine {
    pub fn new(cfg: Config, creds: Credentials) -> Result<Engine, KeyError> {
        if cfg.node_id.is_empty() || cfg.audience.is_empty() {
            return Err(KeyError::Invalid(
                "node id and audience must not be empty".into(),
            ));
        }
        let mut keys = Bounded::new(cfg.cache_entries);
        let psk_mac = match &creds {
            Credentials::Psk(p) => Some(Arc::new(p.mac.clone())),
            Credentials::Pki(pki) => {
                let PkiCredentials { key, peers, .. } = &**pki;
                if key.node != cfg.node_id {
                    return Err(KeyError::Invalid(format!(
                        "node key is for {:?}, config says {:?}",
                        key.node, cfg.node_id
                    )));
                }
                for p in peers {
                    keys.insert(p.node.clone(), p.clone());
                }
                None
            }
        };
        Ok(Engine {
            verified: Mutex::new(Bounded::new(cfg.cache_entries)),
            keys: Mutex::new(keys),
            pairs: Mutex::new(Bounded::new(cfg.cache_entries)),
            replay: Mutex::new(ReplayGuard::new(cfg.replay_entries, cfg.replay_window)),
            cfg,
            creds,
            psk_mac,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The trust anchor, in PKI mode.
    pub fn ca(&self) -> Option<&Ca> {
        match &self.creds {
            Credentials::Pki(p) => Some(&p.ca),
            Credentials::Psk(_) => None,
        }
    }

    /// Sign a PU's identity (only the label keys the ruleset reads).
    pub fn local_token(
        &self,
        labels: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<LocalToken, TokenError> {
        let carried: BTreeMap<String, String> = match &self.cfg.label_keys {
            Some(keys) => labels
                .iter()
                .filter(|(k, _)| keys.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => labels.clone(),
        };
        let claims = IdentityClaims {
            iss: self.cfg.node_id.clone(),
            aud: self.cfg.audience.clone(),
            nbf: now.saturating_sub(self.cfg.skew),
            exp: now + self.cfg.token_ttl,
            l: encode_labels(&carried)?,
        };
        let (alg, key) = match &self.creds {
            Credentials::Psk(p) => (Algorithm::HS256, &p.jwt_enc),
            Credentials::Pki(pki) => (Algorithm::ES256, &pki.key.enc),
        };
        let header = Header {
            typ: None,
            ..Header::new(alg)
        };
        let jwt = jsonwebtoken::encode(&header, &claims, key)
            .map_err(|e| TokenError::Claims(e.to_string()))?;
        if jwt.len() > wire::MAX_JWT {
            return Err(TokenError::Oversized {
                size: jwt.len(),
                limit: wire::MAX_JWT,
            });
        }
        Ok(LocalToken {
            digest: sha256(jwt.as_bytes()),
            jwt: jwt.into(),
            refresh_at: (now + self.cfg.token_ttl).saturating_sub(self.cfg.refresh_before),
        })
    }

    fn key_token(&self) -> Option<&str> {
        match &self.creds {
            Credentials::Pki(pki) => pki.key_token.as_deref(),
            Credentials::Psk(_) => None,
        }
    }

    /// The MAC key shared with `peer` (PSK: derived from the PSK; PKI: ECDH
    /// between our node key and the peer's verified key, cached).
    fn pair_key(&self, peer_node: &str, now: u64) -> Result<Arc<hmac::Key>, TokenError> {
        if let Some(k) = &self.psk_mac {
            return Ok(k.clone());
        }
        let Credentials::Pki(pki) = &self.creds else {
            return Err(TokenError::UnknownIssuer(peer_node.into()));
        };
        let key = &pki.key;
        // Hot path (every SYN and SYN-ACK): no allocation and no hashing
        // beyond the map lookups; a rotated peer key forces a new derivation.
        let keys = lock(&self.keys);
        let peer_key = keys
            .get(peer_node)
            .filter(|k| k.not_after + self.cfg.skew >= now)
            .map(|k| &k.public)
            .ok_or_else(|| TokenError::UnknownIssuer(peer_node.into()))?;
        if let Some((public, k)) = lock(&self.pairs).get(peer_node)
            && public == peer_key
        {
            return Ok(k.clone());
        }
        let peer_key = peer_key.clone();
        drop(keys);
        // Both ends must derive the same key: order the names.
        let (a, b) = if key.node.as_str() <= peer_node {
            (key.node.as_str(), peer_node)
        } else {
            (peer_node, key.node.as_str())
        };
        let info = format!("trireme pair v1\0{}\0{a}\0{b}", self.cfg.audience);
        let secret = agreement::agree(
            &key.ecdh,
            agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &peer_key),
            TokenError::Untrusted("peer key rejected by ECDH".into()),
            |shared| Ok(derive(shared, b"trireme ecdh v1", info.as_bytes())),
        )?;
        let k = Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &secret));
        lock(&self.pairs).insert(peer_node.to_string(), (peer_key, k.clone()));
        Ok(k)
    }

    /// Verify an identity JWT (cached) and, in PKI mode, the key that
    /// signed it; returns the peer and the JWT's digest.
    fn verify(
        &self,
        jwt: &str,
        key_token: Option<&str>,
        now: u64,
    ) -> Result<(Arc<Peer>, [u8; 32]), TokenError> {
        if let Some((p, digest)) = lock(&self.verified).get(jwt).cloned() {
            check_times(p.not_before, p.expires, now, self.cfg.skew)?;
            return Ok((p, digest));
        }
        let digest = sha256(jwt.as_bytes());
        let alg = header_alg(jwt)?;
        let mut v;
        let (dec, key_expiry) = match &self.creds {
            Credentials::Psk(p) => {
                if alg != "HS256" {
                    return Err(TokenError::Algorithm(alg));
                }
                v = Validation::new(Algorithm::HS256);
                (p.jwt_dec.clone(), u64::MAX)
            }
            Credentials::Pki(pki) => {
                let ca = &pki.ca;
                if alg != "ES256" {
                    return Err(TokenError::Algorithm(alg));
                }
                v = Validation::new(Algorithm::ES256);
                let iss = unverified_claims::<IdentityClaims>(jwt)?.iss;
                if let Some(kt) = key_token {
                    // Skip the CA signature check when this key is known.
                    let known = lock(&self.keys)
                        .get(iss.as_str())
                        .is_some_and(|k| k.not_after + self.cfg.skew >= now);
                    if !known {
                        let vk = ca.verify_key_token(kt, now, self.cfg.skew)?;
                        if vk.node != iss {
                            return Err(TokenError::Untrusted(
                                "key token names another node".into(),
                            ));
                        }
                        lock(&self.keys).insert(iss.clone(), vk);
                    }
                }
                let keys = lock(&self.keys);
                let k = keys
                    .get(&iss)
                    .filter(|k| k.not_after + self.cfg.skew >= now)
                    .ok_or_else(|| TokenError::UnknownIssuer(iss.clone()))?;
                (k.dec.clone(), k.not_after)
            }
        };
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let c = jsonwebtoken::decode::<IdentityClaims>(jwt, &dec, &v)
            .map_err(jwt_error)?
            .claims;
        if c.aud != self.cfg.audience {
            return Err(TokenError::Audience);
        }
        let peer = Arc::new(Peer {
            labels: decode_labels(&c.l)?,
            node: c.iss,
            not_before: c.nbf,
            expires: c.exp.min(key_expiry),
            view: PeerView::default(),
        });
        check_times(peer.not_before, peer.expires, now, self.cfg.skew)?;
        lock(&self.verified).insert(Arc::from(jwt), (peer.clone(), digest));
        Ok((peer, digest))
    }

    /// Initiator: the SYN payload. `peer_node`, when the enforcer knows which
    /// node serves the destination (learned from an earlier SYN-ACK), lets
    /// PKI mode authenticate the nonce too.
    pub fn syn(&self, local: &LocalToken, peer_node: Option<&str>, now: u64) -> (Vec<u8>, SynSent) {
        let n = nonce();
        let key = match (&self.psk_mac, peer_node) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(p)) => self.pair_key(p, now).ok(),
            (None, None) => None,
        };
        let kt = self.key_token();
        let flags = if kt.is_some() { FLAG_KEY_TOKEN } else { 0 }
            | if key.is_some() { FLAG_SYN_MAC } else { 0 };
        let tail = wire::tail_len(key.is_some(), Some(&local.jwt), kt);
        let b = wire::start(Kind::Syn, flags, &n, None, tail);
        let tag = key.map(|k| mac(&k, &b, Some(&local.digest)));
        let b = wire::finish(b, tag.as_ref().map(|t| t.as_ref()), Some(&local.jwt), kt);
        (b, SynSent { nonce: n })
    }

    /// Responder: verify a SYN payload; ingress policy is then decided on
    /// the returned peer's labels.
    pub fn accept_syn(&self, payload: &[u8], now: u64) -> Result<SynReceived, TokenError> {
        let f = wire::parse(payload)?;
        if f.kind != Kind::Syn {
            return Err(TokenError::WrongType(f.kind as u8));
        }
        let (peer, digest) = self.verify(f.jwt, f.key_token, now)?;
        let key = self.pair_key(&peer.node, now)?;
        match f.mac {
            Some(m) => check_mac(&key, f.prefix, Some(&digest), &m)?,
            None if self.psk_mac.is_some() || self.cfg.require_syn_mac => {
                return Err(TokenError::Mac);
            }
            None => {}
        }
        if !lock(&self.replay).first_sighting(f.nonce, now) {
            return Err(TokenError::Replay);
        }
        Ok(SynReceived {
            nonce: f.nonce,
            peer,
            key,
        })
    }

    /// Responder: the SYN-ACK payload for an accepted SYN.
    pub fn syn_ack(&self, local: &LocalToken, st: &SynReceived) -> (Vec<u8>, AwaitAck) {
        let n = nonce();
        let kt = self.key_token();
        let flags = if kt.is_some() { FLAG_KEY_TOKEN } else { 0 };
        let tail = wire::tail_len(true, Some(&local.jwt), kt);
        let b = wire::start(Kind::SynAck, flags, &n, Some(&st.nonce), tail);
        let tag = mac(&st.key, &b, Some(&local.digest));
        let b = wire::finish(b, Some(tag.as_ref()), Some(&local.jwt), kt);
        (
            b,
            AwaitAck {
                nonces: [st.nonce, n],
                key: st.key.clone(),
                peer: st.peer.clone(),
                completed: false,
            },
        )
    }

    /// Initiator: verify the SYN-ACK (egress policy is then decided on the
    /// returned peer) and produce the ACK payload.
    pub fn accept_syn_ack(
        &self,
        st: &SynSent,
        payload: &[u8],
        now: u64,
    ) -> Result<(Arc<Peer>, Vec<u8>), TokenError> {
        let f = wire::parse(payload)?;
        if f.kind != Kind::SynAck {
            return Err(TokenError::WrongType(f.kind as u8));
        }
        if f.peer_nonce != Some(st.nonce) {
            return Err(TokenError::NonceMismatch);
        }
        let (peer, digest) = self.verify(f.jwt, f.key_token, now)?;
        let key = self.pair_key(&peer.node, now)?;
        let m = f.mac.ok_or(TokenError::Mac)?;
        check_mac(&key, f.prefix, Some(&digest), &m)?;
        let b = wire::start(Kind::Ack, 0, &st.nonce, Some(&f.nonce), MAC);
        let tag = mac(&key, &b, None);
        Ok((peer, wire::finish(b, Some(tag.as_ref()), None, None)))
    }

    /// Responder: the ACK completes the handshake. Succeeds at most once per
    /// handshake: a replayed ACK is refused.
    pub fn accept_ack(&self, st: &mut AwaitAck, payload: &[u8]) -> Result<(), TokenError> {
        let f = wire::parse(payload)?;
        if f.kind != Kind::Ack {
            return Err(TokenError::WrongType(f.kind as u8));
        }
        if [f.nonce, f.peer_nonce.unwrap_or_default()] != st.nonces {
            return Err(TokenError::NonceMismatch);
        }
        let m = f.mac.ok_or(TokenError::Mac)?;
        check_mac(&st.key, f.prefix, None, &m)?;
        if st.completed {
            return Err(TokenError::Replay);
        }
        st.completed = true;
        Ok(())
    }

    /// Forget verified tokens only (benchmarks measure cold verification
    /// with this; pairwise keys stay).
    pub fn forget_verified(&self) {
        *lock(&self.verified) = Bounded::new(self.cfg.cache_entries);
    }

    /// Forget cached verifications (e.g. after a CA or key rotation).
    pub fn clear_caches(&self) {
        *lock(&self.verified) = Bounded::new(self.cfg.cache_entries);
        *lock(&self.pairs) = Bounded::new(self.cfg.cache_entries);
    }
}

impl std::fmt::Debug for SynReceived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynReceived")
            .field("peer", &self.peer)
            .finish()
    }
}

impl std::fmt::Debug for AwaitAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitAck")
            .field("peer", &self.peer)
            .field("completed", &self.completed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_nonces_are_distinct_across_refills() {
        prepare_thread();
        let n = 3 * POOL / NONCE + 7;
        let seen: std::collections::HashSet<_> = (0..n).map(|_| nonce()).collect();
        assert_eq!(seen.len(), n, "a nonce repeated");
        assert!(!seen.contains(&[0u8; NONCE]));
    }

    #[test]
    fn each_thread_has_its_own_pool() {
        let here = nonce();
        let there = std::thread::spawn(nonce).join().unwrap();
        assert_ne!(here, there);
    }
}
