//! The compiled ruleset: deterministic bytes, strict loading, and the tiered
//! evaluator semantics the model carries beyond NetworkPolicy.

use std::path::{Path, PathBuf};
use std::process::Command;
use trireme_compiler::eval::{Endpoint, Evaluator, Flow, Reason};
use trireme_compiler::model::*;
use trireme_compiler::ruleset::{FORMAT_MAJOR, Ruleset, RulesetError};

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(p)
}

fn compile(args: &[&Path], out: &Path) -> Vec<u8> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trireme"));
    cmd.arg("compile");
    for a in args {
        cmd.arg("-f").arg(a);
    }
    let o = cmd.arg("-o").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn same_inputs_in_any_order_give_identical_bytes() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let a = testdata("three-tier/policies.yaml");
    let b = testdata("apobeer/policy.yaml");
    let c = testdata("three-tier/cluster.yaml");
    let one = compile(&[&a, &b, &c], &tmp.join("one.out"));
    let two = compile(&[&c, &b, &a], &tmp.join("two.out"));
    let three = compile(&[&b, &a, &c, &a], &tmp.join("three.out"));
    assert_eq!(one, two);
    assert_eq!(one, three);
}

#[test]
fn directory_and_files_compile_the_same_policies() {
    let loaded_dir = trireme_compiler::source::load(&[testdata("apobeer")]).unwrap();
    let loaded_files = trireme_compiler::source::load(&[
        testdata("apobeer/policy.yaml"),
        testdata("apobeer/cluster.yaml"),
    ])
    .unwrap();
    assert_eq!(loaded_dir.policies.len(), 1);
    assert_eq!(loaded_dir.policies, loaded_files.policies);
}

fn sample() -> Ruleset {
    let loaded = trireme_compiler::source::load(&[testdata("three-tier")]).unwrap();
    trireme_compiler::compile::compile(&loaded)
}

#[test]
fn round_trip_and_content_hash() {
    let rs = sample();
    let bytes = rs.encode();
    let back = Ruleset::decode(&bytes).unwrap();
    assert_eq!(rs, back);
    assert_eq!(rs.content_hash(), back.content_hash());
    assert_eq!(rs.content_hash().len(), 64);
    assert_eq!(
        rs.label_keys,
        vec!["@namespace".to_string(), "tier".to_string()]
    );
}

#[test]
fn damaged_rulesets_are_refused_clearly() {
    let bytes = sample().encode();
    assert_eq!(Ruleset::decode(b"nope"), Err(RulesetError::BadMagic));
    assert!(matches!(
        Ruleset::decode(&bytes[..bytes.len() - 3]),
        Err(RulesetError::Truncated { .. })
    ));
    assert!(matches!(
        Ruleset::decode(&bytes[..30]),
        Err(RulesetError::Truncated { .. })
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(Ruleset::decode(&longer), Err(RulesetError::Trailing(1)));
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert_eq!(Ruleset::decode(&flipped), Err(RulesetError::HashMismatch));
    let mut newer = bytes.clone();
    newer[8..10].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes());
    let err = Ruleset::decode(&newer).unwrap_err();
    assert!(matches!(err, RulesetError::NewerVersion { .. }));
    assert!(err.to_string().contains("newer than this build supports"));
    // Every single-byte corruption is caught, never a panic (bytes 10..12
    // are the minor version: a newer minor is compatible by definition).
    for i in (0..bytes.len()).filter(|i| !(10..12).contains(i)) {
        let mut b = bytes.clone();
        b[i] = b[i].wrapping_add(1);
        assert!(
            Ruleset::decode(&b).is_err(),
            "corruption at byte {i} accepted"
        );
    }
}

fn id(pairs: &[(&str, &str)]) -> Identity {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn rule(action: Action, peer: Selector, ports: Vec<PortRule>) -> Rule {
    Rule {
        action,
        peers: Peers::AnyOf(vec![Peer::Identity(peer)]),
        ports,
        source: SourceRef {
            file: 0,
            line: 1,
            col: 1,
        },
    }
}

fn policy(tier: Tier, priority: i32, name: &str, subject: Selector, ingress: Vec<Rule>) -> Policy {
    Policy {
        tier,
        priority,
        name: PolicyName {
            kind: "Test".into(),
            namespace: None,
            name: name.into(),
        },
        subject,
        ingress: Some(ingress),
        egress: None,
        source: SourceRef {
            file: 0,
            line: 1,
            col: 1,
        },
    }
}

fn sel(k: &str, v: &str) -> Selector {
    Selector::new(vec![Requirement::equals(k, v)])
}

/// Admin allow/deny/pass by priority, then NetworkPolicy, then baseline, then default allow.
#[test]
fn tiers_decide_in_order() {
    let web = id(&[("app", "web")]);
    let db = id(&[("app", "db")]);
    let cache = id(&[("app", "cache")]);
    let admin_pass = policy(
        Tier::Admin,
        10,
        "pass-web",
        sel("app", "db"),
        vec![rule(Action::Pass, sel("app", "web"), vec![])],
    );
    let admin_deny = policy(
        Tier::Admin,
        20,
        "deny-all-to-db",
        sel("app", "db"),
        vec![rule(Action::Deny, Selector::all(), vec![])],
    );
    let admin_allow_cache = policy(
        Tier::Admin,
        5,
        "allow-cache",
        sel("app", "db"),
        vec![rule(Action::Allow, sel("app", "cache"), vec![])],
    );
    let baseline = policy(
        Tier::Baseline,
        1,
        "baseline-deny-cache",
        sel("app", "web"),
        vec![rule(Action::Deny, sel("app", "cache"), vec![])],
    );
    let rs = Ruleset::new(
        vec!["t".into()],
        vec![admin_pass, admin_deny, admin_allow_cache, baseline],
    );
    let ev = Evaluator::new(&rs);
    let flow = |src: &Identity, dst: &Identity| {
        ev.evaluate(&Flow {
            src: Endpoint {
                identity: Some(src),
                ip: None,
                ports: &[],
                node: None,
            },
            dst: Endpoint {
                identity: Some(dst),
                ip: None,
                ports: &[],
                node: None,
            },
            port: 80,
            protocol: Protocol::Tcp,
        })
    };
    // cache -> db: priority 5 allow wins before the deny at 20.
    let d = flow(&cache, &db);
    assert!(d.allowed);
    assert!(matches!(
        d.ingress.reason,
        Reason::Rule {
            action: Action::Allow,
            ..
        }
    ));
    // web -> db: pass at 10 skips the deny at 20; no NetworkPolicy; baseline has nothing for db: default allow.
    let d = flow(&web, &db);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.ingress.reason, Reason::Default);
    assert_eq!(d.ingress.passed_by.len(), 1);
    // db -> db: deny at 20.
    assert!(!flow(&db, &db).allowed);
    // cache -> web: baseline deny.
    let d = flow(&cache, &web);
    assert!(!d.allowed);
    assert!(matches!(
        d.ingress.reason,
        Reason::Rule {
            action: Action::Deny,
            ..
        }
    ));
}

#[test]
fn namespace_tier_overrides_baseline_and_pass_reaches_it() {
    let web = id(&[("app", "web")]);
    let db = id(&[("app", "db")]);
    let np = policy(
        Tier::Namespace,
        0,
        "np-db",
        sel("app", "db"),
        vec![rule(Action::Allow, sel("app", "web"), vec![])],
    );
    let pass = policy(
        Tier::Admin,
        1,
        "pass",
        Selector::all(),
        vec![rule(Action::Pass, Selector::all(), vec![])],
    );
    let base = policy(
        Tier::Baseline,
        1,
        "base-deny",
        Selector::all(),
        vec![rule(Action::Deny, Selector::all(), vec![])],
    );
    let rs = Ruleset::new(vec!["t".into()], vec![np, pass, base]);
    let ev = Evaluator::new(&rs);
    let ep = |i| Endpoint {
        identity: Some(i),
        ip: None,
        ports: &[],
        node: None,
    };
    let f = |s, d| {
        ev.evaluate(&Flow {
            src: ep(s),
            dst: ep(d),
            port: 1,
            protocol: Protocol::Udp,
        })
    };
    assert!(f(&web, &db).allowed, "namespace tier allows after pass");
    assert!(!f(&db, &db).allowed, "isolated by the namespace tier");
    assert!(matches!(
        f(&db, &db).ingress.reason,
        Reason::Isolated { .. }
    ));
    assert!(
        !f(&db, &web).allowed,
        "baseline deny for the unisolated web"
    );
}
