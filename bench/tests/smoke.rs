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

/// Records a skipped precondition the way scripts/test.sh counts it (a
/// `SKIP: test: reason` line in `REAPD_SKIP_LOG`; one it does not expect
/// fails the run). The bench crate does not depend on the e2e helpers.
fn skip(reason: &str) {
    let line = format!("SKIP: bench smoke: {reason}\n");
    eprint!("{line}");
    if let Some(path) = std::env::var_os("REAPD_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

#[test]
fn quick_run_writes_a_report() {
    if !rustix::process::geteuid().is_root() {
        skip("the benchmark needs root");
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
    // bench/run.sh leaves the side by side's fragment there first; the
    // report puts it in as section 5, before the notes.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("lmk_side_by_side.md"), "| side by side fragment |\n").unwrap();
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
        "## 0. Against the floor",
        "tonic echo (gRPC floor)",
        "JSON echo (varlink floor)",
        "(joint gRPC floor)",
        "(joint varlink floor)",
        "reapd varlink",
        "## 1. Memory back",
        "KillAndReap, reapd gRPC",
        "CheckPermission throughput",
        "## 3. Footprint",
        "## 4. Scale",
    ] {
        assert!(report.contains(needle), "report lacks {needle:?}:\n{report}");
    }
    let five = report.find("## 5. Low-memory killers side by side\n\n| side by side fragment |\n");
    assert!(
        five.is_some_and(|at| report.find("## Notes").is_none_or(|notes| at < notes)),
        "section 5 missing or after the notes:\n{report}"
    );
    // Instructions per call (section 0, callgrind under the valgrind that
    // bench/valgrind.sh fetches): counted for the in-process check and
    // every server, or a counted skip that says why not.
    let section0 = report.split("## Headline").next().unwrap_or_default();
    if let Some(note) = section0
        .lines()
        .filter_map(|l| l.strip_prefix("- "))
        .find(|n| n.contains("no instruction counts"))
    {
        skip(note);
    } else {
        let rows: Vec<&str> = section0
            .lines()
            .skip_while(|l| !l.starts_with("| server | transport | CPU µs/call"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert!(rows.len() >= 5, "no cost table in section 0:\n{section0}");
        for row in rows {
            let ir = row.trim_end_matches(" |").rsplit("| ").next().unwrap_or_default();
            assert!(
                ir.parse::<f64>().is_ok(),
                "no instruction count in {row:?}:\n{section0}"
            );
        }
    }
    // A part of the run the benchmark left out (no v1 freezer, no font for
    // the plots) is a note in its report, not a failure of the run: each
    // is a visible, counted skip here, never a silent pass.
    let notes = report.split("\n## Notes\n").nth(1).unwrap_or_default();
    for note in notes.lines().filter_map(|l| l.strip_prefix("- ")) {
        let left_out = [
            "skipped",
            "lacks",
            "not found",
            "no instruction counts",
            "failed",
            "stopped there",
        ];
        if left_out.iter().any(|phrase| note.contains(phrase)) {
            skip(note);
        }
    }
    // The frozen state is the one the broker exists for (a frozen victim
    // cannot exit, so only a reap gives its memory back): measured unless
    // skipped above.
    if !notes.contains("frozen state skipped") {
        assert!(report.contains("frozen"), "no frozen-state measurement:\n{report}");
    }
}
