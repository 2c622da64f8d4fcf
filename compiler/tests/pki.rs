//! `trireme pki` through the binary: files, modes, refusal to overwrite,
//! and inspect.

use std::process::{Command, Output};

fn trireme(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn ca_init_issue_inspect() {
    let d = std::env::temp_dir().join(format!("trireme-pki-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let dir = d.to_str().unwrap();
    let out = trireme(&[
        "pki",
        "ca",
        "init",
        "--dir",
        dir,
        "--trust-domain",
        "td.example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = trireme(&[
        "pki",
        "ca",
        "init",
        "--dir",
        dir,
        "--trust-domain",
        "td.example",
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let out = trireme(&["pki", "issue", "--ca", dir, "--node", "node-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for f in ["node-1.key", "node-1.pem", "node-1.keytoken"] {
        assert!(stdout.contains(f), "{stdout}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("node-1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = trireme(&["pki", "inspect", d.join("node-1.pem").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CN=node-1") && text.contains("O=td.example"),
        "{text}"
    );
    let out = trireme(&["pki", "inspect", d.join("missing").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&d);
}
