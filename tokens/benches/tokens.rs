//! Per-connection token costs, with jsonwebtoken's own ES256 verification
//! as the baseline in the same process.
//!
//! `cargo bench -p trireme-tokens --bench tokens`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};
use trireme_tokens::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median per-call time over batches of `batch` calls.
fn measure(batch: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..batch {
        f();
    }
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        samples.push(t.elapsed() / batch);
    }
    median(samples)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
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

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

fn main() {
    let t = now();
    let labels = ten_labels();
    let dir = std::env::temp_dir().join(format!("trireme-tokens-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    pki::ca_init(&dir, "td.example", 30, false).unwrap();
    for n in ["node-a", "node-b"] {
        pki::issue(&dir, n, None, &dir, 30, false).unwrap();
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let pki_engine = |node: &str, peer: &str, kt: bool| {
        let ca = Ca::from_pem(read("ca.pem").as_bytes(), "td.example").unwrap();
        let peer = ca
            .verify_node_cert(read(&format!("{peer}.pem")).as_bytes(), t, 0)
            .unwrap();
        Engine::new(
            Config::new(node, "td.example"),
            Credentials::Pki(Box::new(PkiCredentials {
                key: NodeKey::from_pem(node, &read(&format!("{node}.key"))).unwrap(),
                ca,
                key_token: kt.then(|| read(&format!("{node}.keytoken"))),
                peers: if kt { vec![] } else { vec![peer] },
            })),
        )
        .unwrap()
    };
    let psk = |node: &str| {
        Engine::new(
            Config::new(node, "td.example"),
            Credentials::Psk(Box::new(Psk::new(&[7u8; 32]).unwrap())),
        )
        .unwrap()
    };
    println!(
        "mode | produce SYN | accept SYN (cached) | full handshake, both sides | SYN payload bytes (10 labels)"
    );
    for (name, a, b) in [
        ("PSK", psk("node-a"), psk("node-b")),
        (
            "PKI, pre-distributed certs",
            pki_engine("node-a", "node-b", false),
            pki_engine("node-b", "node-a", false),
        ),
        (
            "PKI, key token on the wire",
            pki_engine("node-a", "node-b", true),
            pki_engine("node-b", "node-a", true),
        ),
    ] {
        let la = a.local_token(&labels, t).unwrap();
        let lb = b.local_token(&labels, t).unwrap();
        let (syn, _) = a.syn(&la, None, t);
        b.accept_syn(&syn, t).unwrap();
        let produce = measure(1000, || {
            black_box(a.syn(&la, Some("node-b"), t));
        });
        // Fresh SYNs (new nonces) prepared outside the timed loop.
        let syns: Vec<Vec<u8>> = (0..250_000)
            .map(|_| a.syn(&la, Some("node-b"), t).0)
            .collect();
        let mut it = syns.iter();
        let accept = measure(1000, || {
            black_box(b.accept_syn(it.next().unwrap(), t).unwrap());
        });
        let full = measure(200, || {
            let (syn, sent) = a.syn(&la, Some("node-b"), t);
            let got = b.accept_syn(&syn, t).unwrap();
            let (synack, mut wait) = b.syn_ack(&lb, &got);
            let (_, ack) = a.accept_syn_ack(&sent, &synack, t).unwrap();
            b.accept_ack(&mut wait, &ack).unwrap();
        });
        println!(
            "{name} | {:.2} µs | {:.2} µs | {:.2} µs | {}",
            us(produce),
            us(accept),
            us(full),
            syn.len()
        );
    }

    // Cold verification: our accept with the verified-token cache emptied
    // each time, against jsonwebtoken's bare ES256 decode of the same JWT.
    let a = pki_engine("node-a", "node-b", false);
    let b = pki_engine("node-b", "node-a", false);
    let la = a.local_token(&labels, t).unwrap();
    let syns: Vec<Vec<u8>> = (0..4_000)
        .map(|_| a.syn(&la, Some("node-b"), t).0)
        .collect();
    let mut it = syns.iter();
    let cold = measure(10, || {
        b.forget_verified();
        black_box(b.accept_syn(it.next().unwrap(), t).unwrap());
    });
    let key = NodeKey::from_pem("node-a", &read("node-a.key")).unwrap();
    let pubkey = key.public_key().to_vec();
    let dec = jsonwebtoken::DecodingKey::from_ec_der(&pubkey);
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.validate_aud = false;
    let jwt = la.jwt().to_string();
    let lib = measure(10, || {
        black_box(jsonwebtoken::decode::<serde_json::Value>(&jwt, &dec, &v).unwrap());
    });
    println!(
        "cold ES256 accept: {:.1} µs (jsonwebtoken decode alone: {:.1} µs, ratio {:.2})",
        us(cold),
        us(lib),
        us(cold) / us(lib)
    );
    let sign = measure(10, || {
        black_box(a.local_token(&labels, t).unwrap());
    });
    println!(
        "signing a PU's identity JWT (once per PU per refresh): {:.1} µs",
        us(sign)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
