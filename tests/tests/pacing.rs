// SPDX-License-Identifier: MIT OR Apache-2.0
//! SIGTERM grace (issue 12): a victim that exits on SIGTERM within the
//! grace period is not SIGKILLed; one that ignores SIGTERM is killed and
//! reaped once the grace period is over.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reapd_e2e::{varlink_call_as, varlink_socket, Broker, Creds};

/// A python3 victim with `handler` for SIGTERM; prints its pid.
fn victim(handler: &str) -> (std::process::Child, i32) {
    let code = format!(
        "import os, signal, sys, time\n{handler}\nprint(os.getpid(), flush=True)\nwhile True: time.sleep(60)\n"
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(code)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

fn kill_with_grace(broker: &Broker, pid: i32, grace_ms: u64) -> reapd_e2e::Value {
    varlink_call_as(
        Creds::ROOT,
        &varlink_socket(broker),
        &format!(r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{pid},"graceMs":{grace_ms}}}}}"#),
        &[],
    )
}

#[test]
fn a_victim_that_exits_on_sigterm_within_the_grace_is_not_sigkilled() {
    let broker = Broker::start();
    let (mut child, pid) = victim("signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))");
    let reply = kill_with_grace(&broker, pid, 5000);
    assert_eq!(reply["parameters"]["outcome"], "exited_before_reap", "{reply}");
    assert!(
        reply["parameters"]["notReapedReason"]
            .as_str()
            .unwrap()
            .contains("SIGTERM"),
        "{reply}"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7), "it exited by its own handler, not by SIGKILL");
}

#[test]
fn a_victim_that_ignores_sigterm_is_killed_after_the_grace() {
    let broker = Broker::start();
    let (mut child, pid) = victim("signal.signal(signal.SIGTERM, signal.SIG_IGN)");
    let started = Instant::now();
    let reply = kill_with_grace(&broker, pid, 300);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL came before the grace ended"
    );
    let outcome = reply["parameters"]["outcome"].as_str().unwrap_or_default();
    assert!(matches!(outcome, "reaped" | "exited_before_reap"), "{reply}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}
