//! The body of the fuzz target (tokens/fuzz), also run over the seed corpus
//! by an ordinary test so CI without nightly still exercises it.

use crate::handshake::{Config, Credentials, Engine, PkiCredentials};
use crate::keys::{Ca, NodeKey, Psk};
use std::sync::OnceLock;

struct Fixture {
    psk: Engine,
    pki: Engine,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fuzz CA");
        let ca_cert = params.self_signed(&ca_key).expect("CA");
        let node = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let pki = Engine::new(
            Config::new("node-b", "td"),
            Credentials::Pki(Box::new(PkiCredentials {
                key: NodeKey::from_pem("node-b", &node.serialize_pem()).expect("node key"),
                ca: Ca::from_pem(ca_cert.pem().as_bytes(), "td").expect("CA"),
                key_token: None,
                peers: vec![],
            })),
        )
        .expect("engine");
        let psk = Engine::new(
            Config::new("node-b", "td"),
            Credentials::Psk(Box::new(Psk::new(&[9u8; 32]).expect("psk"))),
        )
        .expect("engine");
        Fixture { psk, pki }
    })
}

/// Feed arbitrary bytes to every entry point that reads the network.
pub fn exercise(data: &[u8]) {
    let _ = crate::wire::parse(data);
    let f = fixture();
    let now = 1_800_000_000;
    for e in [&f.psk, &f.pki] {
        let _ = e.accept_syn(data, now);
        let sent = e.syn(&local(e), None, now).1;
        let _ = e.accept_syn_ack(&sent, data, now);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::claims::decode_labels(s);
        let _ = crate::claims::header_alg(s);
        let _ = f.pki_ca().verify_key_token(s, now, 30);
    }
}

fn local(e: &Engine) -> crate::handshake::LocalToken {
    static L: OnceLock<(crate::handshake::LocalToken, crate::handshake::LocalToken)> =
        OnceLock::new();
    let f = fixture();
    let (psk, pki) = L.get_or_init(|| {
        let labels = [("app".to_string(), "x".to_string())].into();
        (
            f.psk.local_token(&labels, 1_800_000_000).expect("token"),
            f.pki.local_token(&labels, 1_800_000_000).expect("token"),
        )
    });
    if std::ptr::eq(e, &f.psk) {
        psk.clone()
    } else {
        pki.clone()
    }
}

impl Fixture {
    fn pki_ca(&self) -> &Ca {
        self.pki.ca().expect("PKI engine")
    }
}
