//! The rule language end to end through the `trireme` binary: semantics
//! equal to the YAML it replaces, mixing with YAML, errors (several per
//! run, file:line:col, the line and a caret), lints, `fmt`, and robustness.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use trireme_compiler::rules::{format, parse};

fn trireme(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(args)
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(p)
        .display()
        .to_string()
}

fn tmp(name: &str, body: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trrl-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn three_tier_in_the_rule_language_matches_the_yaml() {
    let cluster = repo("testdata/three-tier/cluster.yaml");
    let rules = repo("testdata/rules/three-tier.trireme");
    let yaml = repo("testdata/three-tier");
    let a = trireme(&[
        "matrix", "-f", &cluster, "-f", &rules, "--port", "80", "--port", "8080", "-o", "json",
    ]);
    let b = trireme(&[
        "matrix", "-f", &yaml, "--port", "80", "--port", "8080", "-o", "json",
    ]);
    assert!(a.status.success(), "{}", out(&a));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn rule_files_mix_with_yaml_and_explain_their_lines() {
    let apobeer = repo("testdata/apobeer");
    let guard = repo("testdata/rules/guardrails.trireme");
    let o = trireme(&[
        "check",
        "-f",
        &apobeer,
        "-f",
        &guard,
        "--from",
        "beer/frontend",
        "--to",
        "169.254.169.254",
        "--port",
        "80",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let t = out(&o);
    assert!(t.contains("Policy no-metadata"), "{t}");
    assert!(t.contains("guardrails.trireme:8:3"), "{t}");
    // Baseline: nothing isolates the frontend, so the baseline decides.
    let o = trireme(&[
        "check",
        "-f",
        &apobeer,
        "-f",
        &guard,
        "--from",
        "beer/external",
        "--to",
        "beer/frontend",
        "--port",
        "80",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).contains("BaselineAdminNetworkPolicy")
            || out(&o).contains("Policy same-team-by-default"),
        "{}",
        out(&o)
    );
}

#[test]
fn several_syntax_errors_in_one_run_with_line_and_caret() {
    let f = tmp(
        "syntax.trireme",
        "policy a {\n  select app = web\n  allow egress from app = x\n}\n\npolicy b tier nowhere {\n  select any\n}\n\npolicy c {\n  select app = \"unterminated\n}\n\npolicy d {\n  select any\n  allow ingress on tcp/80\n",
    );
    let o = trireme(&["compile", "-f", f.to_str().unwrap(), "-o", "/dev/null"]);
    assert_eq!(o.status.code(), Some(2));
    let t = out(&o);
    let name = f.display().to_string();
    assert!(
        t.contains(&format!(
            "{name}:3:16: error: egress rules name their peers with `to`, not `from`"
        )),
        "{t}"
    );
    assert!(
        t.contains("3 |   allow egress from app = x\n  |                ^"),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "{name}:6:15: error: expected `admin`, `namespace` or `baseline`"
        )),
        "{t}"
    );
    assert!(t.contains("unterminated string"), "{t}");
    assert!(
        t.contains("expected `allow`, `deny`, `pass`, `isolate`, `ask` or `}`"),
        "{t}"
    );
}

#[test]
fn validation_errors() {
    let cases = [
        (
            "policy a {\n  select any\n  deny ingress\n}\n",
            "3:3: error: namespace-tier policies only allow",
        ),
        (
            "policy a tier admin {\n  select any\n}\n",
            "1:8: error: a `tier admin` policy needs a `priority`",
        ),
        (
            "policy a tier admin priority 2000 {\n  select any\n}\n",
            "priority 2000 is out of range",
        ),
        (
            "policy a {\n  select any\n  allow ingress from cidr 10.0.0/8\n}\n",
            "is not a CIDR",
        ),
        (
            "policy a {\n  select any\n  allow ingress from cidr 10.0.0.0/8 except 192.168.0.0/16\n}\n",
            "must be a strict subset",
        ),
        (
            "policy a {\n  select any\n  allow ingress on tcp/70000\n}\n",
            "ports are 1-65535",
        ),
        (
            "policy a {\n  select any\n  allow ingress on tcp/90-80\n}\n",
            "ends before it starts",
        ),
        (
            "policy a tier baseline {\n  select any\n  pass ingress\n}\n",
            "`pass` is for `tier admin` policies",
        ),
        ("policy a {\n  select Bad_Key! = x\n}\n", "error:"),
        (
            "policy a {\n  select any\n}\npolicy a {\n  select any\n}\n",
            "duplicate policy \"a\"",
        ),
        ("allow ingress\n", "expected `policy`"),
    ];
    for (src, want) in cases {
        let f = tmp("v.trireme", src);
        let o = trireme(&["compile", "-f", f.to_str().unwrap(), "-o", "/dev/null"]);
        assert_eq!(o.status.code(), Some(2), "accepted:\n{src}");
        assert!(
            out(&o).contains(want),
            "want {want:?} in\n{}\nfor\n{src}",
            out(&o)
        );
    }
}

#[test]
fn lints_warn_and_deny_warnings_fails() {
    let f = tmp(
        "lint.trireme",
        "policy a tier admin priority 1 {\n  select app = a, app = b\n  allow ingress\n  deny ingress from app = x\n  allow egress from @secret = 1\n}\n".replace("allow egress from", "allow egress to").as_str(),
    );
    let dst = std::env::temp_dir().join(format!("trrl-{}.out", std::process::id()));
    let o = trireme(&[
        "compile",
        "-f",
        f.to_str().unwrap(),
        "-o",
        dst.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let t = out(&o);
    assert!(
        t.contains("2:19: warning: the requirements on `app` contradict each other"),
        "{t}"
    );
    assert!(
        t.contains("4:3: warning: this rule is shadowed by the rule at line 3:3"),
        "{t}"
    );
    assert!(
        t.contains("warning: `@secret` is a reserved system key"),
        "{t}"
    );
    let o = trireme(&[
        "compile",
        "--deny-warnings",
        "-f",
        f.to_str().unwrap(),
        "-o",
        dst.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out(&o).contains("3 warning(s) and --deny-warnings"),
        "{}",
        out(&o)
    );
}

#[test]
fn fmt_is_canonical_idempotent_and_checkable() {
    let messy = "# header\npolicy   web tier admin   priority 5{select app=web,tier in(a,b) ,!legacy\n allow ingress from app=x or cidr 10.0.0.0/8 except 10.1.0.0/16 on 80,udp/53 , tcp/8000-8100\n # note\n deny ingress}\n";
    let f = tmp("messy.trireme", messy);
    let o = trireme(&["fmt", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", out(&o));
    let once = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        once,
        "# header\npolicy web tier admin priority 5 {\n  select app = web, tier in (a, b), !legacy\n  allow ingress from app = x or cidr 10.0.0.0/8 except 10.1.0.0/16 on tcp/80, udp/53, tcp/8000-8100\n  # note\n  deny ingress\n}\n"
    );
    let g = tmp("once.trireme", &once);
    let o = trireme(&["fmt", g.to_str().unwrap()]);
    assert_eq!(String::from_utf8(o.stdout).unwrap(), once, "idempotent");
    assert_eq!(
        trireme(&["fmt", "--check", g.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        trireme(&["fmt", "--check", f.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    assert!(
        trireme(&["fmt", "--write", f.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(std::fs::read_to_string(&f).unwrap(), once);
}

/// A tiny deterministic generator (no extra dependency): random syntax
/// trees → fmt → parse must give the same tree back, and fmt must be
/// idempotent.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.next(xs.len() as u64) as usize]
    }
}

fn random_file(r: &mut Rng) -> trireme_compiler::rules::ast::File {
    use trireme_compiler::model::{Action, Direction, Protocol};
    use trireme_compiler::rules::ast::*;
    let words = [
        "app",
        "tier",
        "on",
        "web",
        "a.b/c",
        "x-1",
        "any",
        "with space",
        "q\"uote",
        "@namespace",
        "",
    ];
    let req = |r: &mut Rng| ReqAst {
        pos: Pos(0),
        key: r.pick(&words[..10]).to_string(),
        kind: match r.next(6) {
            0 => ReqKind::Eq(r.pick(&words).to_string()),
            1 => ReqKind::Ne(r.pick(&words).to_string()),
            2 => ReqKind::In(vec![r.pick(&words).to_string(), r.pick(&words).to_string()]),
            3 => ReqKind::NotIn(vec![r.pick(&words).to_string()]),
            4 => ReqKind::Exists,
            _ => ReqKind::NotExists,
        },
    };
    let mut policies = Vec::new();
    for k in 0..r.next(4) + 1 {
        let select = (0..r.next(3)).map(|_| req(r)).collect();
        let mut rules = Vec::new();
        for _ in 0..r.next(4) {
            let mut ru = RuleAst {
                pos: Pos(0),
                verb: match r.next(4) {
                    0 => Verb::Act(Action::Allow),
                    1 => Verb::Act(Action::Deny),
                    2 => Verb::Act(Action::Pass),
                    _ => Verb::Isolate,
                },
                direction: if r.next(2) == 0 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                peers: None,
                ports: vec![],
            };
            if ru.verb != Verb::Isolate {
                if r.next(2) == 0 {
                    let mut peers = Vec::new();
                    for _ in 0..r.next(2) + 1 {
                        peers.push(if r.next(3) == 0 {
                            PeerAst::Cidr {
                                pos: Pos(0),
                                cidr: "10.0.0.0/8".into(),
                                except: vec![("10.1.0.0/16".into(), Pos(0))],
                            }
                        } else {
                            PeerAst::Labels((0..r.next(3)).map(|_| req(r)).collect())
                        });
                    }
                    ru.peers = Some(peers);
                }
                for _ in 0..r.next(3) {
                    ru.ports.push(PortAst {
                        pos: Pos(0),
                        protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                            [r.next(3) as usize],
                        spec: match r.next(3) {
                            0 => PortSpec::Any,
                            1 => PortSpec::Range(80, 80 + r.next(3) as u32),
                            _ => PortSpec::Named("http".into()),
                        },
                    });
                }
            }
            rules.push(ru);
        }
        policies.push(PolicyAst {
            pos: Pos(0),
            name: format!("{}{k}", r.pick(&["p", "policy", "with space"])),
            name_pos: Pos(0),
            tier: [
                None,
                Some(TierAst::Admin),
                Some(TierAst::Namespace),
                Some(TierAst::Baseline),
            ][r.next(4) as usize],
            priority: if r.next(2) == 0 {
                Some((r.next(1000) as i64, Pos(0)))
            } else {
                None
            },
            select,
            rules,
        });
    }
    File { policies }
}

#[test]
fn parse_of_fmt_is_the_same_tree() {
    let mut r = Rng(0x9e3779b97f4a7c15);
    for _ in 0..2000 {
        let f = random_file(&mut r);
        let text = format::format(&f, "");
        let back = parse::parse(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        assert_eq!(back, f, "\n{text}");
        assert_eq!(format::format(&back, &text), text, "idempotent");
    }
}

#[test]
fn mutated_input_never_panics() {
    let seed = std::fs::read_to_string(repo("testdata/rules/guardrails.trireme")).unwrap()
        + &std::fs::read_to_string(repo("testdata/rules/three-tier.trireme")).unwrap();
    let bytes = seed.as_bytes();
    let mut r = Rng(42);
    let alphabet = b"{}()=!,\"#/-@: \nabcxyz019policytierallowdenyfromtoon";
    for _ in 0..20_000 {
        let mut b = bytes.to_vec();
        for _ in 0..r.next(6) + 1 {
            let at = r.next(b.len() as u64) as usize;
            match r.next(3) {
                0 => b[at] = alphabet[r.next(alphabet.len() as u64) as usize],
                1 => {
                    b.remove(at);
                }
                _ => b.insert(at, alphabet[r.next(alphabet.len() as u64) as usize]),
            }
        }
        let text = String::from_utf8_lossy(&b);
        let name: std::sync::Arc<str> = std::sync::Arc::from("m.trireme");
        let _ = trireme_compiler::rules::load(&name, &text, 0, &[]);
        let _ = trireme_compiler::rules::format_text(&name, &text);
    }
}

/// The cargo-fuzz regression corpus (compiler/fuzz/regressions) replayed
/// with the fuzz target's checks, so that CI keeps it green without libFuzzer.
#[test]
fn fuzz_regressions_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        let name: std::sync::Arc<str> = std::sync::Arc::from(p.display().to_string());
        let _ = trireme_compiler::rules::load(&name, &text, 0, &[]);
        if let Ok(tree) = parse::parse(&text) {
            let out = format::format(&tree, &text);
            assert_eq!(parse::parse(&out).unwrap(), tree, "{}", p.display());
        }
        n += 1;
    }
    assert!(n >= 3);
}
