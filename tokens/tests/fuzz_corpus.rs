//! The fuzz target's body over its seed corpus and deterministic mutations
//! of it, so that CI (stable, no libFuzzer) still proves "no panic" on the
//! interesting shapes. `cargo +nightly fuzz run token` explores further.

use std::path::PathBuf;
use trireme_tokens::fuzzing::exercise;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/token")
}

#[test]
fn corpus_and_mutations_do_not_panic() {
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 6, "seed corpus present");
    let mut rng = 0x853c49e6748fea9bu64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for s in &seeds {
        exercise(s);
        for _ in 0..300 {
            let mut m = s.clone();
            match next() % 4 {
                0 if !m.is_empty() => {
                    let i = (next() as usize) % m.len();
                    m[i] ^= 1 << (next() % 8);
                }
                1 => m.truncate((next() as usize) % (s.len() + 1)),
                2 => {
                    let i = (next() as usize) % (m.len() + 1);
                    m.insert(i, next() as u8);
                }
                _ if m.len() > 4 => {
                    // Corrupt a length field region.
                    let i = 4 + (next() as usize) % (m.len() - 4);
                    m[i] = 0xff;
                }
                _ => {}
            }
            exercise(&m);
        }
    }
}

/// Regenerate the seed corpus: `cargo test -p trireme-tokens --test
/// fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    use trireme_tokens::*;
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let t = 1_800_000_000;
    let labels = [
        ("app".to_string(), "web".to_string()),
        ("@namespace".to_string(), "shop".to_string()),
    ]
    .into();
    let mk = || {
        Engine::new(
            Config::new("node-a", "td"),
            Credentials::Psk(Box::new(Psk::new(&[9u8; 32]).unwrap())),
        )
        .unwrap()
    };
    let (a, b) = (mk(), mk());
    let la = a.local_token(&labels, t).unwrap();
    let (syn, sent) = a.syn(&la, None, t);
    let got = b.accept_syn(&syn, t).unwrap();
    let (synack, _) = b.syn_ack(&la, &got);
    let (_, ack) = a.accept_syn_ack(&sent, &synack, t).unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    write("psk-syn", &syn);
    write("psk-synack", &synack);
    write("psk-ack", &ack);
    write("labels", b"app=web,@namespace=shop,@ns:team=a");
    write("jwt", la.jwt().as_bytes());
    write("garbage", b"\x01\x01\x00\x00GET / HTTP/1.1\r\n");
    let d = std::env::temp_dir().join("trireme-seed-pki");
    let _ = std::fs::remove_dir_all(&d);
    pki::ca_init(&d, "td", 30, false).unwrap();
    pki::issue(&d, "node-a", None, &d, 30, false).unwrap();
    let kt = std::fs::read_to_string(d.join("node-a.keytoken")).unwrap();
    write("key-token", kt.as_bytes());
    let e = Engine::new(
        Config::new("node-a", "td"),
        Credentials::Pki(Box::new(PkiCredentials {
            key: NodeKey::from_pem(
                "node-a",
                &std::fs::read_to_string(d.join("node-a.key")).unwrap(),
            )
            .unwrap(),
            ca: Ca::from_pem(&std::fs::read(d.join("ca.pem")).unwrap(), "td").unwrap(),
            key_token: Some(kt),
            peers: vec![],
        })),
    )
    .unwrap();
    let l = e.local_token(&labels, t).unwrap();
    write("pki-syn-keytoken", &e.syn(&l, None, t).0);
    let _ = std::fs::remove_dir_all(&d);
}
