//! Round trips in every mode, and each rejection with its own error (and
//! counter name).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trireme_tokens::wire::{self, Kind};
use trireme_tokens::*;

const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn labels(app: &str) -> BTreeMap<String, String> {
    [
        ("app", app),
        ("@namespace", "shop"),
        ("@ns:kubernetes.io/metadata.name", "shop"),
        ("tier", "web"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn psk_engine(node: &str, psk: &[u8], aud: &str) -> Engine {
    Engine::new(
        Config::new(node, aud),
        Credentials::Psk(Box::new(Psk::new(psk).unwrap())),
    )
    .unwrap()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trireme-tokens-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CA in `dir` with nodes issued under it.
fn pki(dir: &Path, td: &str, nodes: &[&str]) {
    pki::ca_init(dir, td, 30, false).unwrap();
    for n in nodes {
        pki::issue(dir, n, None, dir, 30, false).unwrap();
    }
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap()
}

/// A PKI engine for `node`; `peers` are pre-distributed certificates,
/// `send_kt` sends our key token on the wire.
fn pki_engine(
    dir: &Path,
    node: &str,
    peers: &[&str],
    send_kt: bool,
    cfg: Option<Config>,
) -> Engine {
    let ca = Ca::from_pem(read(dir, "ca.pem").as_bytes(), "td.example").unwrap();
    let peers = peers
        .iter()
        .map(|p| {
            ca.verify_node_cert(read(dir, &format!("{p}.pem")).as_bytes(), now(), 0)
                .unwrap()
        })
        .collect();
    let key = NodeKey::from_pem(node, &read(dir, &format!("{node}.key"))).unwrap();
    let kt = send_kt.then(|| read(dir, &format!("{node}.keytoken")));
    Engine::new(
        cfg.unwrap_or_else(|| Config::new(node, "td.example")),
        Credentials::Pki(Box::new(PkiCredentials {
            key,
            ca,
            key_token: kt,
            peers,
        })),
    )
    .unwrap()
}

/// A full handshake between initiator `a` and responder `b`.
fn handshake(a: &Engine, b: &Engine, hint: Option<&str>) -> (Peer, Peer) {
    let t = now();
    let la = a.local_token(&labels("client"), t).unwrap();
    let lb = b.local_token(&labels("server"), t).unwrap();
    let (syn, sent) = a.syn(&la, hint, t);
    let got = b.accept_syn(&syn, t).expect("SYN accepted");
    let (synack, mut wait) = b.syn_ack(&lb, &got);
    let (server, ack) = a
        .accept_syn_ack(&sent, &synack, t)
        .expect("SYN-ACK accepted");
    b.accept_ack(&mut wait, &ack).expect("ACK accepted");
    ((*got.peer).clone(), (*server).clone())
}

#[test]
fn psk_round_trip() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let (client, server) = handshake(&a, &b, None);
    assert_eq!(client.node, "node-a");
    assert_eq!(client.labels, labels("client"));
    assert_eq!(server.node, "node-b");
    assert_eq!(server.labels["app"], "server");
}

/// Connections that carry the same token share one verified `Peer`, so an
/// enforcer's view of its labels (`Peer::view`) is built once, not per SYN.
#[test]
fn one_view_per_verified_token() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let t = now();
    let la = a.local_token(&labels("client"), t).unwrap();
    let built = std::sync::atomic::AtomicUsize::new(0);
    let mut views = Vec::new();
    for _ in 0..3 {
        let (syn, _) = a.syn(&la, None, t);
        let got = b.accept_syn(&syn, t).expect("SYN accepted");
        let view = got.peer.view.get_or_init(|| {
            built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            got.peer.labels.len()
        });
        assert_eq!(view, Some(&4));
        views.push(got.peer.clone());
    }
    assert_eq!(built.into_inner(), 1);
    // Another type in the same slot is refused, not confused.
    assert_eq!(views[0].view.get_or_init(|| "other"), None);
    // The view is no part of the identity.
    assert_eq!(
        *views[0],
        Peer {
            view: PeerView::default(),
            ..(*views[1]).clone()
        }
    );
}

#[test]
fn pki_round_trip_with_predistributed_certs() {
    let d = tmpdir("pki-certs");
    pki(&d, "td.example", &["node-a", "node-b"]);
    let a = pki_engine(&d, "node-a", &["node-b"], false, None);
    let b = pki_engine(&d, "node-b", &["node-a"], false, None);
    let (client, server) = handshake(&a, &b, None);
    assert_eq!(
        (client.node.as_str(), server.node.as_str()),
        ("node-a", "node-b")
    );
    // Knowing the peer node, the initiator authenticates its nonce too.
    handshake(&a, &b, Some("node-b"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn pki_round_trip_with_key_tokens_and_syn_mac_policy() {
    let d = tmpdir("pki-kt");
    pki(&d, "td.example", &["node-a", "node-b"]);
    let a = pki_engine(&d, "node-a", &[], true, None);
    let mut strict = Config::new("node-b", "td.example");
    strict.require_syn_mac = true;
    let b = pki_engine(&d, "node-b", &[], true, Some(strict));
    let t = now();
    let la = a.local_token(&labels("client"), t).unwrap();
    // First contact: a cannot MAC its nonce, and b requires it.
    let (syn, _) = a.syn(&la, None, t);
    assert_eq!(b.accept_syn(&syn, t).err(), Some(TokenError::Mac));
    // b now knows a's key (from the key token); a learns b's from the SYN-ACK.
    let b2 = pki_engine(&d, "node-b", &[], true, None);
    handshake(&a, &b2, None);
    // With the peer known, the strict responder accepts.
    let (client, _) = handshake(&a, &b, Some("node-b"));
    assert_eq!(client.labels, labels("client"));
    let _ = std::fs::remove_dir_all(&d);
}

fn syn_parts(syn: &[u8]) -> (Vec<u8>, String) {
    let f = wire::parse(syn).unwrap();
    (f.nonce.to_vec(), f.jwt.to_string())
}

/// Rebuild a SYN with another JWT (and no MAC / key token).
fn syn_with_jwt(jwt: &str) -> Vec<u8> {
    let b = wire::start(Kind::Syn, 0, &[7; 16], None, 0);
    wire::finish(b, None, Some(jwt), None)
}

#[test]
fn tampered_labels_are_refused() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let t = now();
    let la = a.local_token(&labels("client"), t).unwrap();
    let (syn, _) = a.syn(&la, None, t);
    let (_, jwt) = syn_parts(&syn);
    let parts: Vec<&str> = jwt.split('.').collect();
    let body = String::from_utf8(B64.decode(parts[1]).unwrap()).unwrap();
    let forged = body.replace("app=client", "app=server");
    let forged = format!("{}.{}.{}", parts[0], B64.encode(forged), parts[2]);
    // Signed frame around the forged JWT: the signature must fail first.
    let f = wire::parse(&syn).unwrap();
    let frame = wire::start(Kind::Syn, f.flags, &f.nonce, None, 0);
    let frame = wire::finish(frame, f.mac.as_ref().map(|m| &m[..]), Some(&forged), None);
    let e = b.accept_syn(&frame, t).unwrap_err();
    assert_eq!(e, TokenError::Signature);
    assert_eq!(e.counter(), "token_signature");
}

#[test]
fn wrong_psk_is_refused() {
    let a = psk_engine("node-a", PSK, "td");
    let b = psk_engine("node-b", b"another key, also 32 bytes long!", "td");
    let t = now();
    let (syn, _) = a.syn(&a.local_token(&labels("x"), t).unwrap(), None, t);
    assert_eq!(b.accept_syn(&syn, t).err(), Some(TokenError::Signature));
}

#[test]
fn short_psk_is_refused_and_there_is_no_default() {
    assert!(matches!(Psk::new(b"short"), Err(KeyError::PskTooShort(5))));
    assert!(matches!(
        Psk::new(&[0u8; 31]),
        Err(KeyError::PskTooShort(31))
    ));
}

#[test]
fn wrong_node_key_is_refused() {
    // node-b's certificate says one key; a token signed by another key that
    // claims to be node-b fails the signature.
    let d = tmpdir("wrongkey");
    pki(&d, "td.example", &["node-a", "node-b", "mallory"]);
    let a = pki_engine(&d, "node-a", &["node-b"], false, None);
    let mallory_key = read(&d, "mallory.key");
    let fake_b = Engine::new(
        Config::new("node-b", "td.example"),
        Credentials::Pki(Box::new(PkiCredentials {
            key: NodeKey::from_pem("node-b", &mallory_key).unwrap(),
            ca: Ca::from_pem(read(&d, "ca.pem").as_bytes(), "td.example").unwrap(),
            key_token: None,
            peers: vec![],
        })),
    )
    .unwrap();
    let t = now();
    let (syn, _) = fake_b.syn(&fake_b.local_token(&labels("x"), t).unwrap(), None, t);
    assert_eq!(a.accept_syn(&syn, t).err(), Some(TokenError::Signature));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn wrong_ca_is_refused() {
    let (d1, d2) = (tmpdir("ca1"), tmpdir("ca2"));
    pki(&d1, "td.example", &["node-a"]);
    pki(&d2, "td.example", &["node-b"]);
    let a = pki_engine(&d1, "node-a", &[], true, None);
    let b = pki_engine(&d2, "node-b", &[], true, None);
    let t = now();
    let (syn, _) = a.syn(&a.local_token(&labels("x"), t).unwrap(), None, t);
    let e = b.accept_syn(&syn, t).unwrap_err();
    assert!(matches!(e, TokenError::Untrusted(_)), "{e:?}");
    assert_eq!(e.counter(), "token_untrusted");
    // A certificate from the other CA is refused too.
    let ca2 = Ca::from_pem(read(&d2, "ca.pem").as_bytes(), "td.example").unwrap();
    let e = ca2
        .verify_node_cert(read(&d1, "node-a.pem").as_bytes(), t, 0)
        .unwrap_err();
    assert!(matches!(e, TokenError::Untrusted(_)), "{e:?}");
    // Without a key token or certificate, the issuer is unknown.
    let a_silent = pki_engine(&d1, "node-a", &[], false, None);
    let (syn, _) = a_silent.syn(&a_silent.local_token(&labels("x"), t).unwrap(), None, t);
    assert_eq!(
        b.accept_syn(&syn, t).err(),
        Some(TokenError::UnknownIssuer("node-a".into()))
    );
    let _ = std::fs::remove_dir_all(&d1);
    let _ = std::fs::remove_dir_all(&d2);
}

#[test]
fn expired_and_not_yet_valid() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let t = now();
    let la = a.local_token(&labels("x"), t).unwrap();
    let (syn, _) = a.syn(&la, None, t);
    // ttl 3600 + skew 30.
    assert_eq!(
        b.accept_syn(&syn, t + 3700).err(),
        Some(TokenError::Expired)
    );
    let (syn, _) = a.syn(&la, None, t);
    assert_eq!(
        b.accept_syn(&syn, t - 100).err(),
        Some(TokenError::NotYetValid)
    );
    // Cached verification still checks time.
    let (syn, _) = a.syn(&la, None, t);
    b.accept_syn(&syn, t).unwrap();
    let (syn, _) = a.syn(&la, None, t);
    assert_eq!(
        b.accept_syn(&syn, t + 3700).err(),
        Some(TokenError::Expired)
    );
    assert!(la.needs_refresh(t + 2700) && !la.needs_refresh(t + 100));
}

#[test]
fn wrong_audience() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td-1"),
        psk_engine("node-b", PSK, "td-2"),
    );
    let t = now();
    let (syn, _) = a.syn(&a.local_token(&labels("x"), t).unwrap(), None, t);
    assert_eq!(b.accept_syn(&syn, t).err(), Some(TokenError::Audience));
}

#[test]
fn alg_none_and_algorithm_confusion() {
    let d = tmpdir("alg");
    pki(&d, "td.example", &["node-a", "node-b"]);
    let b = pki_engine(&d, "node-b", &["node-a"], false, None);
    let t = now();
    let claims = format!(
        r#"{{"iss":"node-a","aud":"td.example","nbf":{},"exp":{},"l":"app=admin"}}"#,
        t - 10,
        t + 100
    );
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none"}"#),
        B64.encode(&claims)
    );
    // "alg: none" with an empty signature is not even a compact JWS to us.
    let e = b.accept_syn(&syn_with_jwt(&none), t).unwrap_err();
    assert!(
        matches!(e, TokenError::Malformed(_) | TokenError::Algorithm(_)),
        "{e:?}"
    );
    let none = format!(
        "{}.{}.AA",
        B64.encode(r#"{"alg":"none"}"#),
        B64.encode(&claims)
    );
    assert_eq!(
        b.accept_syn(&syn_with_jwt(&none), t).err(),
        Some(TokenError::Algorithm("none".into()))
    );
    // HS256 keyed with node-a's *public* key (known to everyone).
    let a_pub = NodeKey::from_pem("node-a", &read(&d, "node-a.key"))
        .unwrap()
        .public_key()
        .to_vec();
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::from_str::<serde_json::Value>(&claims).unwrap(),
        &jsonwebtoken::EncodingKey::from_secret(&a_pub),
    )
    .unwrap();
    let e = b.accept_syn(&syn_with_jwt(&forged), t).unwrap_err();
    assert_eq!(e, TokenError::Algorithm("HS256".into()));
    assert_eq!(e.counter(), "token_algorithm");
    // And a PSK verifier refuses ES256.
    let a = pki_engine(&d, "node-a", &[], false, None);
    let (syn, _) = a.syn(&a.local_token(&labels("x"), t).unwrap(), None, t);
    let p = psk_engine("node-b", PSK, "td.example");
    assert_eq!(
        p.accept_syn(&syn, t).err(),
        Some(TokenError::Algorithm("ES256".into()))
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn oversized_truncated_and_garbage() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let t = now();
    let (syn, _) = a.syn(&a.local_token(&labels("x"), t).unwrap(), None, t);
    let mut big = syn.clone();
    big.resize(wire::MAX_FRAME + 1, b'A');
    assert!(matches!(
        b.accept_syn(&big, t),
        Err(TokenError::Oversized { .. })
    ));
    // A JWT field claiming more than the limit.
    let mut f = wire::start(Kind::Syn, 0, &[1; 16], None, 0);
    f.extend_from_slice(&(wire::MAX_JWT as u16 + 1).to_be_bytes());
    f.resize(f.len() + wire::MAX_JWT + 1, b'a');
    assert!(matches!(
        b.accept_syn(&f, t),
        Err(TokenError::Oversized { .. })
    ));
    for cut in [0, 3, 10, 25, syn.len() - 1] {
        assert_eq!(
            b.accept_syn(&syn[..cut], t).err(),
            Some(TokenError::Truncated),
            "cut {cut}"
        );
    }
    let mut trailing = syn.clone();
    trailing.push(0);
    assert!(matches!(
        b.accept_syn(&trailing, t),
        Err(TokenError::Malformed(_))
    ));
    assert_eq!(
        b.accept_syn(b"GET / HTTP/1.1\r\n", t).err(),
        Some(TokenError::Version(b'G'))
    );
    let mut wrong = syn.clone();
    wrong[1] = 9;
    assert_eq!(
        b.accept_syn(&wrong, t).err(),
        Some(TokenError::WrongType(9))
    );
    // A labels claim we cannot parse is refused even when signed.
    let mut bad = Config::new("node-a", "td");
    bad.token_ttl = 10;
    assert!(
        a.local_token(&[("a".to_string(), "x,y".to_string())].into(), t)
            .is_err()
    );
}

#[test]
fn replayed_syn_and_ack_and_nonce_mismatch() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let t = now();
    let la = a.local_token(&labels("client"), t).unwrap();
    let lb = b.local_token(&labels("server"), t).unwrap();
    let (syn, sent) = a.syn(&la, None, t);
    let got = b.accept_syn(&syn, t).unwrap();
    // The same SYN again (captured and re-sent).
    let e = b.accept_syn(&syn, t).unwrap_err();
    assert_eq!(
        (e.clone(), e.counter()),
        (TokenError::Replay, "token_replay")
    );
    let (synack, mut wait) = b.syn_ack(&lb, &got);
    let (_, ack) = a.accept_syn_ack(&sent, &synack, t).unwrap();
    b.accept_ack(&mut wait, &ack).unwrap();
    assert_eq!(
        b.accept_ack(&mut wait, &ack).err(),
        Some(TokenError::Replay)
    );

    // A SYN-ACK answering another SYN.
    let (_, other) = a.syn(&la, None, t);
    assert_eq!(
        a.accept_syn_ack(&other, &synack, t).err(),
        Some(TokenError::NonceMismatch)
    );
    // An old ACK presented for a new handshake.
    let (syn2, _) = a.syn(&la, None, t);
    let got2 = b.accept_syn(&syn2, t).unwrap();
    let (_, mut wait2) = b.syn_ack(&lb, &got2);
    assert_eq!(
        b.accept_ack(&mut wait2, &ack).err(),
        Some(TokenError::NonceMismatch)
    );

    // A replayed SYN that escapes the replay memory (a fresh responder)
    // still cannot complete: the replayer has neither the initiator's
    // nonce-bound ACK nor the key to make one.
    let fresh = psk_engine("node-b", PSK, "td");
    let got3 = fresh.accept_syn(&syn, t).unwrap();
    let (_, mut wait3) = fresh.syn_ack(&lb, &got3);
    assert_eq!(
        fresh.accept_ack(&mut wait3, &ack).err(),
        Some(TokenError::NonceMismatch)
    );
    let mut forged = ack.clone();
    forged[20..36].copy_from_slice(&wire::parse(&fresh.syn_ack(&lb, &got3).0).unwrap().nonce);
    assert!(fresh.accept_ack(&mut wait3, &forged).is_err());
}

#[test]
fn tampered_nonce_or_mac_is_refused() {
    let (a, b) = (
        psk_engine("node-a", PSK, "td"),
        psk_engine("node-b", PSK, "td"),
    );
    let t = now();
    let la = a.local_token(&labels("client"), t).unwrap();
    let (mut syn, _) = a.syn(&la, None, t);
    syn[5] ^= 1;
    assert_eq!(b.accept_syn(&syn, t).err(), Some(TokenError::Mac));
    // PSK SYNs must carry a MAC.
    let (_, jwt) = syn_parts(&a.syn(&la, None, t).0);
    assert_eq!(
        b.accept_syn(&syn_with_jwt(&jwt), t).err(),
        Some(TokenError::Mac)
    );
}

#[test]
fn counters_are_distinct() {
    use std::collections::BTreeSet;
    let all = [
        TokenError::Oversized { size: 0, limit: 0 },
        TokenError::Truncated,
        TokenError::Malformed(""),
        TokenError::Version(0),
        TokenError::WrongType(0),
        TokenError::Algorithm(String::new()),
        TokenError::Signature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::Audience,
        TokenError::UnknownIssuer(String::new()),
        TokenError::Untrusted(String::new()),
        TokenError::Mac,
        TokenError::NonceMismatch,
        TokenError::Replay,
        TokenError::Claims(String::new()),
    ];
    let names: BTreeSet<_> = all.iter().map(|e| e.counter()).collect();
    assert_eq!(names.len(), all.len());
}

#[test]
fn token_size_ten_labels_pki() {
    let d = tmpdir("size");
    pki(&d, "td.example", &["node-1"]);
    let a = pki_engine(&d, "node-1", &[], false, None);
    let l = ten_labels();
    let t = now();
    let tok = a.local_token(&l, t).unwrap();
    let (syn, _) = a.syn(&tok, None, t);
    assert!(syn.len() < 400, "SYN payload {} bytes", syn.len());
    // Every label arrives.
    let b = pki_engine(&d, "node-1", &["node-1"], false, None);
    assert_eq!(b.accept_syn(&syn, t).unwrap().peer.labels, l);
    let _ = std::fs::remove_dir_all(&d);
}

fn ten_labels() -> BTreeMap<String, String> {
    [
        ("app", "checkout"),
        ("team", "payments"),
        ("tier", "backend"),
        ("env", "prod"),
        ("version", "v2"),
        ("role", "api"),
        ("@namespace", "shop"),
        ("@ns:team", "payments"),
        ("@ns:env", "prod"),
        ("@ns:kubernetes.io/metadata.name", "shop"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn pki_files_and_modes() {
    let d = tmpdir("files");
    pki::ca_init(&d, "td.example", 30, false).unwrap();
    assert!(
        pki::ca_init(&d, "td.example", 30, false).is_err(),
        "refuses to overwrite"
    );
    pki::ca_init(&d, "td.example", 30, true).unwrap();
    pki::issue(&d, "node-x", None, &d, 30, false).unwrap();
    assert!(pki::issue(&d, "node-x", None, &d, 30, false).is_err());
    assert!(pki::issue(&d, "bad name!", None, &d, 30, false).is_err());
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca.key", "node-x.key"] {
        let m = std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o600, "{f}");
    }
    let s = pki::inspect(&d.join("node-x.pem")).unwrap();
    assert!(
        s.contains("CN=node-x") && s.contains("CA:        false"),
        "{s}"
    );
    assert!(
        pki::inspect(&d.join("node-x.keytoken"))
            .unwrap()
            .contains("node-x")
    );
    assert!(pki::inspect(&d.join("ca.key")).unwrap().contains("600"));
    // Sign a CSR made elsewhere (rcgen here; openssl works the same way).
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec!["ignored".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    std::fs::write(d.join("n.csr"), csr.pem().unwrap()).unwrap();
    let out = d.join("out");
    pki::issue(&d, "node-csr", Some(&d.join("n.csr")), &out, 30, false).unwrap();
    assert!(!out.join("node-csr.key").exists());
    let ca = Ca::from_pem(read(&d, "ca.pem").as_bytes(), "td.example").unwrap();
    let vk = ca
        .verify_node_cert(read(&out, "node-csr.pem").as_bytes(), now(), 0)
        .unwrap();
    assert_eq!(vk.node, "node-csr");
    assert_eq!(vk.public, key.public_key_raw());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn certificate_directory() {
    let (d, other) = (tmpdir("certdir"), tmpdir("certdir-other"));
    pki(&d, "td.example", &["node-a", "node-b"]);
    pki(&other, "td.example", &["intruder"]);
    std::fs::copy(other.join("intruder.pem"), d.join("intruder.pem")).unwrap();
    let ca = Ca::from_pem(read(&d, "ca.pem").as_bytes(), "td.example").unwrap();
    let (good, bad) = ca.load_cert_dir(&d, now(), 0).unwrap();
    let names: Vec<_> = good.iter().map(|k| k.node.as_str()).collect();
    assert_eq!(names, ["node-a", "node-b"]);
    assert_eq!(bad.len(), 1);
    assert!(bad[0].0.ends_with("intruder.pem"));
    assert!(matches!(bad[0].1, TokenError::Untrusted(_)));
    // An expired certificate is refused.
    let e = ca
        .verify_node_cert(read(&d, "node-a.pem").as_bytes(), now() + 40 * 86400, 0)
        .unwrap_err();
    assert_eq!(e, TokenError::Expired);
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&other);
}
