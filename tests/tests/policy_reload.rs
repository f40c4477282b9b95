// SPDX-License-Identifier: MIT OR Apache-2.0
//! SIGHUP reload under load: 1000 reloads, every other one of an invalid
//! file, while clients call. No call may fail for any reason but its
//! decision, and the policy in force at the end is the last valid one.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reapd_e2e::{unsafe_kill, Broker, Creds, Victim};

const CALLER: u32 = 61500;
const OWNER: u32 = 61501;

fn valid(i: usize) -> String {
    format!(
        r#"[defaults]
kill-rule = false

[limits]
kills = 100000
burst = 100000
max-in-flight = 1000

[[rule]]
name = "storm-{i:05}"
actions = ["kill-and-reap", "check"]
caller.uids = [{CALLER}]
target.uids = [{OWNER}]
"#
    )
}

/// Invalid in a different way each time: syntax, unknown key, unknown
/// user, bad range, bad glob.
fn invalid(i: usize) -> String {
    let broken = match i % 5 {
        0 => "[[rule]\n".to_string(),
        1 => "[limits]\nkillz = 5\n".to_string(),
        2 => "[[rule]]\nname = \"x\"\nactions = [\"check\"]\ncaller.users = [\"reapd-no-such-user\"]\ntarget.any = true\n".to_string(),
        3 => format!("[protect]\nuids = [\"{OWNER}-1\"]\n"),
        _ => "[protect]\nunits = [\"a[\"]\n".to_string(),
    };
    // Valid-looking rules first, so a half-read file would change things.
    valid(i) + &broken
}

/// Reads a growing log from where it last stopped.
struct Tail {
    file: std::fs::File,
    pos: u64,
    buf: String,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail {
            file: std::fs::File::open(path).unwrap(),
            pos: 0,
            buf: String::new(),
        }
    }

    /// Waits until a line containing `needle` appears after what was seen.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.buf.find(needle) {
                self.buf.drain(..at + needle.len());
                return true;
            }
            let mut more = String::new();
            self.file.seek(SeekFrom::Start(self.pos)).unwrap();
            let n = self.file.read_to_string(&mut more).unwrap_or(0);
            self.pos += n as u64;
            self.buf.push_str(&more);
            if n == 0 {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

fn write_atomically(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn reload_storm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    write_atomically(&path, &valid(0));
    let broker = Broker::start_with(&["--policy", path.to_str().unwrap()], &[]);
    let mut tail = Tail::new(&broker.log);
    assert!(tail.wait_for("SIGHUP reloads the policy", Duration::from_secs(10)));

    let victim = Victim::spawn(Creds::uid(OWNER), 0);
    let done = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let grpc = broker.grpc.clone();
    let socket = grpc.to_str().unwrap().to_string();
    let mut clients = Vec::new();
    // Checkers: every answer must be "allowed by rule storm-*".
    for _ in 0..2 {
        let (done, calls, socket) = (done.clone(), calls.clone(), socket.clone());
        let pid = victim.pid.to_string();
        clients.push(std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let r = ctl(&socket, &["check", &pid]);
                calls.fetch_add(1, Ordering::Relaxed);
                let reason = r.json["reason"].as_str().unwrap_or_default().to_string();
                if r.code != 0 || !reason.contains("storm-") {
                    failures.push(format!("check: {r:?}"));
                }
            }
            failures
        }));
    }
    // A killer: fresh victims, each must be killed under some storm rule.
    {
        let (done, calls, socket) = (done.clone(), calls.clone(), socket.clone());
        clients.push(std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mut v = Victim::spawn(Creds::uid(OWNER), 0);
                let r = ctl(&socket, &["kill", &v.pid.to_string()]);
                calls.fetch_add(1, Ordering::Relaxed);
                let rule = r.json["rule"].as_str().unwrap_or_default().to_string();
                if r.code != 0 || !rule.starts_with("storm-") {
                    failures.push(format!("kill: {r:?}"));
                } else {
                    assert_eq!(v.wait(), Some(libc::SIGKILL));
                }
            }
            failures
        }));
    }

    let started = Instant::now();
    for i in 1..=1000 {
        let ok = i % 2 == 0;
        write_atomically(&path, &if ok { valid(i) } else { invalid(i) });
        assert!(unsafe_kill(broker.pid(), libc::SIGHUP));
        // Each signal is handled before the next file is written, so every
        // file is read by exactly the reload its signal asked for.
        let needle = if ok {
            format!("first_rule=storm-{i:05}")
        } else {
            "policy reload refused".to_string()
        };
        assert!(
            tail.wait_for(&needle, Duration::from_secs(10)),
            "reload {i} not logged; log:\n{}",
            broker.log_text()
        );
    }
    let storm = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} calls failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let calls = calls.load(Ordering::Relaxed);
    assert!(calls > 0);
    eprintln!("1000 reloads in {storm:?} with {calls} client calls");

    // The last file (1000) was valid; make one more invalid and check the
    // policy in force is still storm-01000.
    write_atomically(&path, &invalid(1001));
    assert!(unsafe_kill(broker.pid(), libc::SIGHUP));
    assert!(tail.wait_for("policy reload refused", Duration::from_secs(10)));
    let r = ctl(&socket, &["check", &victim.pid.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.json["reason"].as_str().unwrap().contains("storm-01000"), "{r:?}");
}

fn ctl(socket: &str, args: &[&str]) -> reapd_e2e::CtlResult {
    let mut command = std::process::Command::new(reapd_e2e::bin("reapctl"));
    command.arg("--socket").arg(socket).arg("--json").args(args);
    reapd_e2e::CtlResult::from(reapd_e2e::run_as(Creds::uid(CALLER), &mut command))
}
