// SPDX-License-Identifier: MIT OR Apache-2.0
//! Keeps the benchmark from rotting: a `--quick` run (tiny victims, few
//! calls, about half a minute) must finish and write its report. The real
//! run is bench/run.sh, which is too slow for the test suite.

use std::path::PathBuf;
use std::process::Command;

/// The broker built alongside this test (target/<profile>/reapd).
fn reapd() -> PathBuf {
    if let Some(dir) = std::env::var_os("REAPD_BIN_DIR") {
        return PathBuf::from(dir).join("reapd");
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_reapd-bench"));
    bench.with_file_name("reapd")
}

#[test]
fn quick_run_writes_a_report() {
    if !rustix::process::geteuid().is_root() {
        // A visible, counted skip (scripts/test.sh lists REAPD_SKIP_LOG).
        let line = "SKIP: bench smoke: the benchmark needs root\n";
        eprint!("{line}");
        if let Some(path) = std::env::var_os("REAPD_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = f.write_all(line.as_bytes());
            }
        }
        return;
    }
    let reapd = reapd();
    assert!(
        reapd.exists(),
        "{} missing: build the workspace first (cargo build --workspace)",
        reapd.display()
    );
    let out = std::env::temp_dir().join(format!("reapd-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_reapd-bench"))
        .arg("run")
        .arg("--quick")
        .arg("--reapd")
        .arg(&reapd)
        .arg("--out")
        .arg(&out)
        .arg("--scratch")
        .arg(out.join("scratch"))
        .status()
        .expect("run reapd-bench");
    let report = std::fs::read_to_string(out.join("benchmarks.md")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);
    assert!(status.success(), "reapd-bench --quick failed: {status}");
    for needle in [
        "## 1. Memory back",
        "KillAndReap, reapd gRPC",
        "CheckPermission throughput",
        "## 3. Footprint",
        "## 4. Scale",
    ] {
        assert!(report.contains(needle), "report lacks {needle:?}:\n{report}");
    }
}
