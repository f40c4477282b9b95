// SPDX-License-Identifier: MIT OR Apache-2.0
//! The systemd files as systemd itself sees them: `systemd-analyze verify`,
//! the `security` exposure score (must stay ≤ 1.0), every syscall the unit
//! names known to systemd, and sysusers/tmpfiles applied to a scratch root.
//! (That the unit's SystemCallFilter= agrees with the broker's own seccomp
//! list is a unit test in broker/src/os/seccomp.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

use reapd_e2e::bin;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The units in a scratch directory, ExecStart= pointing at the built
/// broker (verify checks that the binary exists and is executable).
fn units_in_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let reapd = bin("reapd");
    let lmk = bin("reapd-lmk");
    for name in [
        "reapd.socket",
        "reapd-varlink.socket",
        "reapd.service",
        "reapd-lmk.service",
    ] {
        let text = std::fs::read_to_string(systemd_dir().join(name)).unwrap();
        let text = text
            .replace("/usr/sbin/reapd", reapd.to_str().unwrap())
            .replace("/usr/bin/reapd-lmk", lmk.to_str().unwrap());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// `systemd-analyze security`'s overall exposure of `unit` in `dir`.
fn exposure(dir: &Path, unit: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.join(unit))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains(&format!("Overall exposure level for {unit}")))
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure line:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("{line}");
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"))
}

#[test]
fn units_pass_systemd_analyze_verify() {
    assert!(
        have("systemd-analyze"),
        "systemd-analyze is required (apt-get install systemd)"
    );
    let dir = units_in_tempdir();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("reapd.socket"))
        .arg(dir.path().join("reapd-varlink.socket"))
        .arg(dir.path().join("reapd.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify also loads unrelated system units; only our own lines count.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("reapd")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

#[test]
fn service_exposure_is_at_most_1_0() {
    let dir = units_in_tempdir();
    let score = exposure(dir.path(), "reapd.service");
    assert!(score <= 1.0, "exposure {score} > 1.0");
}

#[test]
fn lmk_service_holds_nothing_and_is_exposed_no_more_than_the_broker() {
    let dir = units_in_tempdir();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("reapd-lmk.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("reapd-lmk")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    let unit = std::fs::read_to_string(systemd_dir().join("reapd-lmk.service")).unwrap();
    for line in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    let lmk = exposure(dir.path(), "reapd-lmk.service");
    let broker = exposure(dir.path(), "reapd.service");
    assert!(lmk <= broker, "reapd-lmk exposure {lmk} > the broker's {broker}");
}

#[test]
fn every_filtered_syscall_is_known_to_systemd() {
    let unit = std::fs::read_to_string(systemd_dir().join("reapd.service")).unwrap();
    let names: Vec<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    assert!(names.iter().any(|n| n == "process_mrelease"));
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager"])
        .output()
        .unwrap();
    let known = String::from_utf8_lossy(&out.stdout);
    let known: std::collections::HashSet<&str> = known.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // systemd 252's tables predate process_mrelease (5.15); it resolves the
    // name through libseccomp at load time, which the VM test exercises.
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !known.contains(n.as_str()) && n.as_str() != "process_mrelease")
        .collect();
    assert!(unknown.is_empty(), "not known to systemd: {unknown:?}");
}

#[test]
fn sysusers_and_tmpfiles_apply_to_a_scratch_root() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(systemd_dir().join("sysusers.d/reapd.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("reapd:"))
        .expect("reapd user created");
    let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system uid: {line}");

    let out = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(systemd_dir().join("tmpfiles.d/reapd.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = std::fs::metadata(root.path().join("run/reapd")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
        0o755
    );
}
