// SPDX-License-Identifier: MIT OR Apache-2.0
//! `reapctl --timeout`: against a socket that accepts and never answers,
//! both transports give up after the bound with exit status 9 and the JSON
//! error kind "timeout" (reapctl(1), EXIT STATUS).

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn reapctl_gives_up_after_timeout_with_exit_status_9_on_both_transports() {
    let dir = std::env::temp_dir().join(format!("reapctl-timeout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("silent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    // Accept, drain, never answer.
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    for transport in [None, Some("--varlink")] {
        let started = Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_reapctl"));
        command
            .args(transport)
            .arg("--timeout")
            .arg("1")
            .arg("--socket")
            .arg(&socket);
        let out = command.args(["--json", "caps"]).output().expect("run reapctl");
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(9), "{transport:?}: {stdout}");
        assert!(stdout.contains("\"error\": \"timeout\""), "{transport:?}: {stdout}");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(5),
            "{transport:?}: took {took:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
