//! Key material: pre-shared keys, node keys, the cluster CA, and verified
//! peer keys.
//!
//! There is no default key anywhere: every constructor takes the secret from
//! its caller, and a PSK shorter than 32 bytes is refused.

use crate::claims::{KeyClaims, b64, check_times, header_alg, unb64};
use crate::error::{KeyError, TokenError};
use aws_lc_rs::{agreement, hkdf, hmac, signature};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256};
use x509_parser::prelude::*;

/// Derive a 32-byte subkey so that the JWT key and the MAC keys are never
/// the same bytes as the configured secret or as each other.
pub(crate) fn derive(secret: &[u8], salt: &[u8], label: &[u8]) -> [u8; 32] {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(secret);
    let mut out = [0u8; 32];
    let info = [label];
    // Expanding 32 bytes from SHA-256 cannot fail.
    if let Ok(okm) = prk.expand(&info, Len32) {
        let _ = okm.fill(&mut out);
    }
    out
}

/// A pre-shared key (PSK mode: every node holds the same secret).
pub struct Psk {
    pub(crate) jwt_enc: EncodingKey,
    pub(crate) jwt_dec: DecodingKey,
    pub(crate) mac: hmac::Key,
}

impl Psk {
    pub const MIN_LEN: usize = 32;

    pub fn new(secret: &[u8]) -> Result<Psk, KeyError> {
        if secret.len() < Self::MIN_LEN {
            return Err(KeyError::PskTooShort(secret.len()));
        }
        let jwt = derive(secret, b"trireme psk v1", b"jwt");
        let mac = derive(secret, b"trireme psk v1", b"mac");
        Ok(Psk {
            jwt_enc: EncodingKey::from_secret(&jwt),
            jwt_dec: DecodingKey::from_secret(&jwt),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &mac),
        })
    }

    /// A file holding base64 (standard alphabet) of at least 32 random bytes,
    /// e.g. `head -c 32 /dev/urandom | base64 > psk`.
    pub fn from_file(path: &std::path::Path) -> Result<Psk, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::PskEncoding(e.to_string()))?;
        Psk::new(&bytes)
    }
}

/// This node's P-256 key: signs its identity tokens (ES256) and derives
/// pairwise MAC keys with peers (ECDH). Using one P-256 key for ECDSA and
/// ECDH is a studied combination (joint security holds in the generic group
/// model); it lets a pre-distributed certificate serve both purposes.
pub struct NodeKey {
    pub(crate) node: String,
    pub(crate) enc: EncodingKey,
    pub(crate) public: Vec<u8>,
    pub(crate) ecdh: agreement::PrivateKey,
}

impl NodeKey {
    /// From a PKCS#8 PEM private key (as `trireme pki issue` writes it).
    pub fn from_pem(node: &str, pem: &str) -> Result<NodeKey, KeyError> {
        let kp = rcgen::KeyPair::from_pem(pem)
            .map_err(|e| KeyError::Invalid(format!("node key: {e}")))?;
        if !kp.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(KeyError::Invalid(
                "node key must be an ECDSA P-256 key".into(),
            ));
        }
        let der = kp.serialized_der();
        let ecdh = agreement::PrivateKey::from_private_key_der(&agreement::ECDH_P256, der)
            .map_err(|e| KeyError::Invalid(format!("node key: {e}")))?;
        Ok(NodeKey {
            node: node.to_string(),
            enc: EncodingKey::from_ec_der(der),
            public: kp.public_key_raw().to_vec(),
            ecdh,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public
    }
}

/// A peer node's public key, verified against the CA.
#[derive(Clone)]
pub struct VerifiedKey {
    pub node: String,
    pub public: Vec<u8>,
    pub(crate) dec: DecodingKey,
    /// The key may be trusted until then (certificate or key token expiry).
    pub not_after: u64,
}

impl std::fmt::Debug for VerifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedKey")
            .field("node", &self.node)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The cluster CA (trust anchor). Its certificate is self-signed; only its
/// public key is needed to verify nodes.
pub struct Ca {
    subject: Vec<u8>,
    public: Vec<u8>,
    dec: DecodingKey,
    audience: String,
}

fn untrusted(msg: impl Into<String>) -> TokenError {
    TokenError::Untrusted(msg.into())
}

fn parse_pem_cert(pem: &[u8]) -> Result<Vec<u8>, TokenError> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|_| untrusted("not a PEM certificate"))?;
    if p.label != "CERTIFICATE" {
        return Err(untrusted(format!(
            "PEM block is {:?}, not CERTIFICATE",
            p.label
        )));
    }
    Ok(p.contents)
}

/// Subject CN, validity and P-256 public point of a certificate.
fn cert_fields(cert: &X509Certificate<'_>) -> Result<(String, u64, u64, Vec<u8>), TokenError> {
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || spki.subject_public_key.data.len() != 65
    {
        return Err(untrusted(
            "certificate key is not an uncompressed P-256 key",
        ));
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| untrusted("certificate has no common name"))?
        .to_string();
    let v = cert.validity();
    let nb = v.not_before.timestamp().max(0) as u64;
    let na = v.not_after.timestamp().max(0) as u64;
    Ok((cn, nb, na, spki.subject_public_key.data.to_vec()))
}

fn verify_cert_signature(
    cert: &X509Certificate<'_>,
    issuer_public: &[u8],
) -> Result<(), TokenError> {
    if cert.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(untrusted("certificate is not signed with ECDSA-SHA256"));
    }
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, issuer_public)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| untrusted("certificate signature is not the CA's"))
}

impl Ca {
    /// Load the CA certificate (PEM). `audience` is the trust domain that key
    /// tokens must name.
    pub fn from_pem(pem: &[u8], audience: &str) -> Result<Ca, KeyError> {
        let der = parse_pem_cert(pem).map_err(|e| KeyError::Invalid(format!("CA: {e}")))?;
        let (_, cert) = parse_x509_certificate(&der)
            .map_err(|e| KeyError::Invalid(format!("CA certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(KeyError::Invalid(
                "CA certificate lacks basicConstraints CA:TRUE".into(),
            ));
        }
        let (_, _, _, public) =
            cert_fields(&cert).map_err(|e| KeyError::Invalid(format!("CA: {e}")))?;
        verify_cert_signature(&cert, &public)
            .map_err(|_| KeyError::Invalid("CA certificate is not self-signed".into()))?;
        Ok(Ca {
            subject: cert.subject().as_raw().to_vec(),
            dec: DecodingKey::from_ec_der(&public),
            public,
            audience: audience.to_string(),
        })
    }

    /// Verify a node certificate (PEM) issued by this CA, valid at `now`.
    pub fn verify_node_cert(
        &self,
        pem: &[u8],
        now: u64,
        skew: u64,
    ) -> Result<VerifiedKey, TokenError> {
        let der = parse_pem_cert(pem)?;
        let (_, cert) =
            parse_x509_certificate(&der).map_err(|_| untrusted("unparsable certificate"))?;
        if cert.issuer().as_raw() != self.subject.as_slice() {
            return Err(untrusted("certificate was issued by another CA"));
        }
        verify_cert_signature(&cert, &self.public)?;
        if cert.is_ca() {
            return Err(untrusted("a CA certificate cannot be a node certificate"));
        }
        let (node, nb, na, public) = cert_fields(&cert)?;
        check_times(nb, na, now, skew)?;
        Ok(VerifiedKey {
            dec: DecodingKey::from_ec_der(&public),
            node,
            public,
            not_after: na,
        })
    }

    /// Verify a key token (a CA-signed JWT binding a node name to its key).
    pub fn verify_key_token(
        &self,
        jwt: &str,
        now: u64,
        skew: u64,
    ) -> Result<VerifiedKey, TokenError> {
        let alg = header_alg(jwt)?;
        if alg != "ES256" {
            return Err(TokenError::Algorithm(alg));
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<KeyClaims>(jwt, &self.dec, &v).map_err(|e| {
            match jwt_error(e) {
                TokenError::Signature => untrusted("key token is not signed by our CA"),
                other => other,
            }
        })?;
        let c = data.claims;
        if c.aud != self.audience {
            return Err(TokenError::Audience);
        }
        check_times(c.nbf, c.exp, now, skew)?;
        let public = unb64(&c.k)?;
        if public.len() != 65 || public[0] != 4 {
            return Err(TokenError::Claims(
                "key token key is not a P-256 point".into(),
            ));
        }
        Ok(VerifiedKey {
            dec: DecodingKey::from_ec_der(&public),
            node: c.sub,
            public,
            not_after: c.exp,
        })
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// Pre-distributed node certificates: every `*.pem` in `dir`, each
    /// verified against this CA. Certificates that fail are reported beside
    /// the good ones (one bad file must not take the node's trust down).
    #[allow(clippy::type_complexity)]
    pub fn load_cert_dir(
        &self,
        dir: &std::path::Path,
        now: u64,
        skew: u64,
    ) -> Result<(Vec<VerifiedKey>, Vec<(std::path::PathBuf, TokenError)>), KeyError> {
        let io = |source| KeyError::Io {
            path: dir.display().to_string(),
            source,
        };
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect();
        paths.sort();
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for p in paths {
            let bytes = std::fs::read(&p).map_err(io)?;
            // The CA's own certificate often sits beside the node certificates.
            if parse_pem_cert(&bytes)
                .ok()
                .and_then(|der| parse_x509_certificate(&der).ok().map(|(_, c)| c.is_ca()))
                == Some(true)
            {
                continue;
            }
            match self.verify_node_cert(&bytes, now, skew) {
                Ok(k) => good.push(k),
                Err(e) => bad.push((p, e)),
            }
        }
        Ok((good, bad))
    }
}

/// Sign a key token for `node` with the CA's private key (PKCS#8 PEM).
pub fn sign_key_token(
    ca_key_pem: &str,
    node: &str,
    node_public: &[u8],
    audience: &str,
    nbf: u64,
    exp: u64,
) -> Result<String, KeyError> {
    let kp = rcgen::KeyPair::from_pem(ca_key_pem)
        .map_err(|e| KeyError::Invalid(format!("CA key: {e}")))?;
    let enc = EncodingKey::from_ec_der(kp.serialized_der());
    let claims = KeyClaims {
        sub: node.to_string(),
        aud: audience.to_string(),
        nbf,
        exp,
        k: b64(node_public),
    };
    let header = jsonwebtoken::Header {
        typ: None,
        ..jsonwebtoken::Header::new(Algorithm::ES256)
    };
    jsonwebtoken::encode(&header, &claims, &enc).map_err(|e| KeyError::Invalid(e.to_string()))
}

pub(crate) fn jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenError::Signature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
            TokenError::Algorithm("mismatch".into())
        }
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::Audience,
        K::Json(_) | K::MissingRequiredClaim(_) | K::InvalidClaimFormat(_) => {
            TokenError::Claims(e.to_string())
        }
        K::InvalidEcdsaKey | K::InvalidKeyFormat => TokenError::Untrusted(e.to_string()),
        _ => TokenError::Malformed("JWT"),
    }
}
