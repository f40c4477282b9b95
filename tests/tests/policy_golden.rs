// SPDX-License-Identifier: MIT OR Apache-2.0
//! `reapd check-policy` golden tests: every file in tests/policy-golden/
//! is checked and the exit status, stdout and stderr compared with its
//! `.expected` file. `REAPD_BLESS=1 cargo test --test policy_golden`
//! rewrites the expected files after a deliberate change.

use std::path::Path;
use std::process::Command;

use reapd_e2e::bin;

fn run(dir: &Path, name: &str) -> String {
    let out = Command::new(bin("reapd"))
        .arg("check-policy")
        .arg(name)
        .current_dir(dir)
        .output()
        .expect("run reapd check-policy");
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        if out.status.success() { "success" } else { "failure" },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_policy_golden() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy-golden");
    let bless = std::env::var_os("REAPD_BLESS").is_some();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "golden files missing in {}", dir.display());
    let mut failures = Vec::new();
    for name in &names {
        let got = run(&dir, name);
        let expected_path = dir.join(name.replace(".toml", ".expected"));
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!("{name}:\n--- expected\n{expected}\n--- got\n{got}"));
        }
        // Every refused file names a position.
        if name.starts_with("ok-") {
            assert!(got.starts_with("exit: success"), "{name}: {got}");
        } else {
            assert!(got.starts_with("exit: failure"), "{name}: {got}");
            assert!(got.contains(&format!("{name}:")), "{name}: no file:line:col in {got}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The daemon refuses to start on an invalid file, and an explicit
/// `--policy` that does not exist is an error too.
#[test]
fn daemon_refuses_invalid_policy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy-golden");
    for file in [dir.join("unknown-user.toml"), dir.join("does-not-exist.toml")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new(bin("reapd"))
            .arg("--grpc-socket")
            .arg(tmp.path().join("g.sock"))
            .arg("--varlink-socket")
            .arg(tmp.path().join("v.sock"))
            .arg("--policy")
            .arg(&file)
            .output()
            .expect("run reapd");
        assert!(!out.status.success(), "{}", file.display());
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("refusing to start"), "{log}");
    }
}
