// SPDX-License-Identifier: MIT OR Apache-2.0
//! The Debian package as a packager and an admin meet it: `systemd/package.sh`
//! (cargo-deb) builds it from the binaries the test run built, lintian finds
//! no error and no warning, its control data and maintainer scripts are
//! debhelper's, and `dpkg --root` installs it into an empty scratch root
//! with no systemd running (as in a container): the maintainer scripts create
//! the reapd user there and enable the sockets there, nothing on the host;
//! a purge removes the conffile.
//!
//! (The package under a real systemd, started and used, is the systemd VM
//! suite: systemd/vm/run.sh.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Built once for all tests of this file (it strips and archives ~100 MiB
/// of debug binaries).
fn deb() -> &'static Path {
    static DEB: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DEB.get_or_init(|| {
        let out_dir = tempfile::tempdir().unwrap();
        let out = Command::new(repo().join("systemd/package.sh"))
            .env("REAPD_BIN_DIR", reapd_e2e::bin_dir())
            .env("REAPD_DEB_OUT", out_dir.path())
            .env("REAPD_DEB_FAST", "1")
            .output()
            .unwrap();
        let stdout = ok(out, "systemd/package.sh");
        let deb = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
        assert!(deb.is_file(), "package.sh printed {stdout:?}");
        (out_dir, deb)
    })
    .1
}

fn dpkg_deb(args: &[&str]) -> String {
    let out = Command::new("dpkg-deb").args(args).arg(deb()).output().unwrap();
    ok(out, "dpkg-deb")
}

#[test]
fn the_deb_holds_binaries_units_docs_and_completions() {
    let list = dpkg_deb(&["-c"]);
    for path in [
        "./usr/sbin/reapd",
        "./usr/bin/reapctl",
        "./usr/lib/systemd/system/reapd.socket",
        "./usr/lib/systemd/system/reapd-varlink.socket",
        "./usr/lib/systemd/system/reapd.service",
        "./usr/lib/sysusers.d/reapd.conf",
        "./usr/lib/tmpfiles.d/reapd.conf",
        "./etc/reapd/policy.toml",
        "./usr/share/man/man8/reapd.8.gz",
        "./usr/share/man/man8/reapd-check-policy.8.gz",
        "./usr/share/man/man1/reapctl.1.gz",
        "./usr/share/man/man1/reapctl-kill.1.gz",
        "./usr/share/bash-completion/completions/reapctl",
        "./usr/share/zsh/vendor-completions/_reapctl",
        "./usr/share/fish/vendor_completions.d/reapctl.fish",
        "./usr/share/doc/reapd/copyright",
        "./usr/share/doc/reapd/changelog.Debian.gz",
        "./usr/share/doc/reapd/policy.md",
    ] {
        assert!(list.contains(path), "{path} missing from {}:\n{list}", deb().display());
    }
    assert!(!list.contains("generate-docs"), "{list}");
}

#[test]
fn control_data_installs_without_systemd_and_scripts_are_debhelpers() {
    let depends = dpkg_deb(&["-f"]);
    let field = |name: &str| {
        depends
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or("")
            .to_owned()
    };
    // systemd only recommended: a container without it can install this.
    let deps = field("Depends");
    assert!(
        !deps
            .split(',')
            .any(|d| d.trim().starts_with("systemd ") || d.trim() == "systemd"),
        "Depends: {deps}"
    );
    assert!(
        deps.contains("systemd-standalone-sysusers | systemd-sysusers"),
        "Depends: {deps}"
    );
    assert_eq!(field("Recommends"), "systemd");
    assert!(!field("Maintainer").contains("example.invalid"));

    let control = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb())
        .arg(control.path())
        .output()
        .unwrap();
    ok(out, "dpkg-deb -e");
    let read = |name: &str| std::fs::read_to_string(control.path().join(name)).unwrap_or_default();
    assert!(read("conffiles").lines().any(|l| l == "/etc/reapd/policy.toml"));
    let postinst = read("postinst");
    for needle in [
        "systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} reapd.conf",
        "deb-systemd-helper enable reapd.service",
        "deb-systemd-invoke start reapd.socket reapd-varlink.socket",
    ] {
        assert!(postinst.contains(needle), "postinst lacks {needle}:\n{postinst}");
    }
    for script in ["postinst", "prerm", "postrm"] {
        let text = read(script);
        // Only debhelper's guarded daemon-reload may name systemctl.
        for line in text
            .lines()
            .filter(|l| l.contains("systemctl") && !l.trim_start().starts_with('#'))
        {
            assert!(line.contains("daemon-reload"), "{script} calls systemctl: {line}");
        }
    }
}

#[test]
fn lintian_finds_no_error_and_no_warning() {
    if Command::new("lintian").arg("--version").output().is_err() {
        // scripts/test.sh installs lintian; a bare `cargo test` may not have it.
        reapd_e2e::skip("lintian_finds_no_error_and_no_warning", "lintian is not installed");
        return;
    }
    let out = Command::new("lintian")
        .args(["--no-cfg", "--tag-display-limit", "0"])
        .arg(deb())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        bad.is_empty(),
        "lintian:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // lintian exits 2 when it could not check at all.
    assert_ne!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dpkg_installs_it_into_an_empty_root_and_purges_it() {
    for tool in ["dpkg", "systemd-sysusers", "deb-systemd-helper"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            reapd_e2e::skip(
                "dpkg_installs_it_into_an_empty_root_and_purges_it",
                &format!("no {tool}"),
            );
            return;
        }
    }
    let root = tempfile::tempdir().unwrap();
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    std::fs::write(root.path().join("var/lib/dpkg/status"), "").unwrap();
    // Where the host runs systemd, deb-systemd-invoke (start, stop) would act
    // on the host's units: the root's policy-rc.d (which it honours under
    // DPKG_ROOT) forbids any action, as in a Docker image build.
    let policy_rc = root.path().join("usr/sbin/policy-rc.d");
    std::fs::create_dir_all(policy_rc.parent().unwrap()).unwrap();
    std::fs::write(&policy_rc, "#!/bin/sh\nexit 101\n").unwrap();
    std::fs::set_permissions(&policy_rc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dpkg = |args: &[&str]| {
        // The scripts run on the host with DPKG_ROOT set (no chroot: the
        // scratch root has no shell); every step they take honours it.
        let out = Command::new("dpkg")
            .arg(format!("--root={}", root.path().display()))
            .args(["--force-script-chrootless", "--force-depends", "--log=/dev/null"])
            .args(args)
            .output()
            .unwrap();
        ok(out, &format!("dpkg {args:?}"))
    };
    dpkg(&["-i", deb().to_str().unwrap()]);
    let r = root.path();
    assert!(r.join("usr/sbin/reapd").is_file());
    assert!(r.join("etc/reapd/policy.toml").is_file());
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).expect("sysusers wrote etc/passwd in the root");
    assert!(passwd.lines().any(|l| l.starts_with("reapd:")), "{passwd}");
    let wants = r.join("etc/systemd/system/sockets.target.wants");
    for socket in ["reapd.socket", "reapd-varlink.socket"] {
        assert!(wants.join(socket).is_symlink(), "{socket} not enabled in the root");
    }
    dpkg(&["--purge", "reapd"]);
    assert!(!r.join("usr/sbin/reapd").exists());
    assert!(!r.join("etc/reapd/policy.toml").exists(), "purge keeps the conffile");
    assert!(!wants.join("reapd.socket").exists(), "purge leaves the socket enabled");
}
