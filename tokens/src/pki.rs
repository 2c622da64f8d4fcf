//! The cluster CA and node credentials (`trireme pki`).
//!
//! A CA is a self-signed P-256 certificate whose Organization is the trust
//! domain (the audience of every token). A node gets a P-256 key, a
//! certificate whose CN is the node id, and a key token (a CA-signed JWT
//! binding the node id to its public key) that it may send on the wire to
//! peers that do not have its certificate.

use crate::error::KeyError;
use crate::keys::{Ca, sign_key_token};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(e: impl std::fmt::Display) -> KeyError {
    KeyError::Invalid(e.to_string())
}

/// Write a file, refusing to replace an existing one unless `force`;
/// private keys get mode 0600 from the moment they exist.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    private: bool,
    force: bool,
) -> Result<(), KeyError> {
    use std::io::Write;
    if path.exists() && !force {
        return Err(KeyError::Invalid(format!(
            "{} exists; pass --force to overwrite it",
            path.display()
        )));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(if private { 0o600 } else { 0o644 });
        let mut f = opts.open(path).map_err(io(path))?;
        // An existing file keeps its old mode through open(): set it.
        f.set_permissions(std::fs::Permissions::from_mode(if private {
            0o600
        } else {
            0o644
        }))
        .map_err(io(path))?;
        f.write_all(contents).map_err(io(path))?;
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        let mut f = opts.open(path).map_err(io(path))?;
        f.write_all(contents).map_err(io(path))?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // Backdate a little for clock skew between nodes.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days as i64);
}

/// `trireme pki ca init`: a new CA in `dir`.
pub fn ca_init(
    dir: &Path,
    trust_domain: &str,
    days: u32,
    force: bool,
) -> Result<Vec<PathBuf>, KeyError> {
    if trust_domain.is_empty() {
        return Err(invalid("the trust domain must not be empty"));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(invalid)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Trireme cluster CA");
    dn.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(invalid)?;
    let (c, k) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&c, &k] {
        if p.exists() && !force {
            return Err(invalid(format!(
                "{} exists; pass --force to overwrite it",
                p.display()
            )));
        }
    }
    write_file(&k, key.serialize_pem().as_bytes(), true, force)?;
    write_file(&c, cert.pem().as_bytes(), false, force)?;
    Ok(vec![c, k])
}

/// The trust domain recorded in a CA certificate (its Organization).
pub fn trust_domain(ca_pem: &str) -> Result<String, KeyError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).map_err(invalid)?;
    let cert = pem.parse_x509().map_err(invalid)?;
    cert.subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| invalid("CA certificate has no Organization (trust domain)"))
}

pub struct Issued {
    pub files: Vec<PathBuf>,
}

/// `trireme pki issue`: a certificate (and, without a CSR, a key) and a key
/// token for `node`, signed by the CA in `ca_dir`, written to `out`.
pub fn issue(
    ca_dir: &Path,
    node: &str,
    csr: Option<&Path>,
    out: &Path,
    days: u32,
    force: bool,
) -> Result<Issued, KeyError> {
    if node.is_empty()
        || !node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(invalid(format!(
            "node name {node:?} must be non-empty ASCII letters, digits, '-', '.', '_'"
        )));
    }
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let td = trust_domain(&ca_pem)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(invalid)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(invalid)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let cert_path = out.join(format!("{node}.pem"));
    let key_path = out.join(format!("{node}.key"));
    let kt_path = out.join(format!("{node}.keytoken"));
    let mut files = Vec::new();
    // Check every target first: never leave a half-issued set behind.
    for p in [&cert_path, &key_path, &kt_path] {
        if p.exists() && !force && (csr.is_none() || p != &key_path) {
            return Err(invalid(format!(
                "{} exists; pass --force to overwrite it",
                p.display()
            )));
        }
    }
    let (cert, public) = match csr {
        Some(csr_path) => {
            let text = std::fs::read_to_string(csr_path).map_err(io(csr_path))?;
            let mut req = CertificateSigningRequestParams::from_pem(&text).map_err(invalid)?;
            if !req.public_key.algorithm().eq(&PKCS_ECDSA_P256_SHA256) {
                return Err(invalid("the CSR's key must be ECDSA P-256"));
            }
            // The CA decides the name and lifetime, not the requester.
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, node);
            req.params.distinguished_name = dn;
            req.params.subject_alt_names = vec![];
            req.params.is_ca = IsCa::ExplicitNoCa;
            validity(&mut req.params, days);
            let public = rcgen::PublicKeyData::der_bytes(&req.public_key).to_vec();
            let cert = req.signed_by(&issuer).map_err(invalid)?;
            (cert, public)
        }
        None => {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(invalid)?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, node);
            params.distinguished_name = dn;
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyAgreement,
            ];
            validity(&mut params, days);
            let cert = params.signed_by(&key, &issuer).map_err(invalid)?;
            write_file(&key_path, key.serialize_pem().as_bytes(), true, force)?;
            files.push(key_path);
            (cert, key.public_key_raw().to_vec())
        }
    };
    let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    // Check the certificate as a verifier will, before anything refers to it.
    let ca = Ca::from_pem(ca_pem.as_bytes(), &td)?;
    ca.verify_node_cert(cert.pem().as_bytes(), now, 0)
        .map_err(invalid)?;
    write_file(&cert_path, cert.pem().as_bytes(), false, force)?;
    files.push(cert_path);
    let kt = sign_key_token(
        &ca_key_pem,
        node,
        &public,
        &td,
        now.saturating_sub(300),
        now + days as u64 * 86400,
    )?;
    write_file(&kt_path, kt.as_bytes(), false, force)?;
    files.push(kt_path);
    Ok(Issued { files })
}

/// `trireme pki inspect`: a human-readable description of a certificate,
/// key token or private key file (never printing secret material).
pub fn inspect(path: &Path) -> Result<String, KeyError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let t = text.trim();
    if t.starts_with("-----BEGIN CERTIFICATE-----") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(t.as_bytes()).map_err(invalid)?;
        let cert = pem.parse_x509().map_err(invalid)?;
        let fp = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.public_key().raw);
        let v = cert.validity();
        return Ok(format!(
            "certificate\n  subject:   {}\n  issuer:    {}\n  CA:        {}\n  valid:     {} .. {}\n  key:       {} (SPKI sha256 {})\n",
            cert.subject(),
            cert.issuer(),
            cert.is_ca(),
            v.not_before,
            v.not_after,
            if cert.public_key().subject_public_key.data.len() == 65 {
                "EC P-256"
            } else {
                "other"
            },
            hex(fp.as_ref()),
        ));
    }
    if t.starts_with("-----BEGIN PRIVATE KEY-----") {
        let kp = KeyPair::from_pem(t).map_err(invalid)?;
        let mode = file_mode(path);
        return Ok(format!(
            "private key\n  algorithm: {}\n  public:    {}\n  mode:      {mode}\n",
            if kp.is_compatible(&PKCS_ECDSA_P256_SHA256) {
                "ECDSA P-256"
            } else {
                "other"
            },
            hex(kp.public_key_raw()),
        ));
    }
    if t.split('.').count() == 3 {
        let c: crate::claims::KeyClaims = crate::claims::unverified_claims(t).map_err(invalid)?;
        return Ok(format!(
            "key token (unverified; `trireme pki inspect` does not check the CA signature)\n  node:      {}\n  trust domain: {}\n  valid:     {} .. {} (unix seconds)\n  key:       {}\n",
            c.sub, c.aud, c.nbf, c.exp, c.k
        ));
    }
    Err(invalid(format!(
        "{}: not a PEM certificate, PEM private key or key token",
        path.display()
    )))
}

fn file_mode(path: &Path) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            return format!("{:o}", m.permissions().mode() & 0o777);
        }
    }
    let _ = path;
    "unknown".into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
