// SPDX-License-Identifier: MIT OR Apache-2.0
//! Least privilege, for real: the broker's capability sets, uid and seccomp
//! state read from /proc, and kills across uids with and without CAP_KILL.

use std::time::Duration;

use reapd_e2e::{wait_for_log, Broker, Creds, Victim};

const MIB: usize = 1 << 20;

/// `Name:` from /proc/PID/status, first column.
fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .to_string()
}

const ONLY_CAP_KILL: &str = "0000000000000020";

/// Wraps the broker in setpriv as `uid` with `caps` (setpriv syntax, e.g.
/// "+kill" or "" for none), after handing it the socket directory.
fn setpriv_wrapper(uid: u32, caps: &str) -> Vec<String> {
    let caps_args = if caps.is_empty() {
        "--inh-caps=-all --bounding-set=-all".to_string()
    } else {
        format!("--inh-caps=-all,{caps} --ambient-caps=-all,{caps} --bounding-set=-all,{caps}")
    };
    // $1 is reapd, $2 --grpc-socket, $3 its path (Broker::start_with).
    let script = format!(
        "chown {uid} \"$(dirname \"$3\")\" && exec setpriv --reuid={uid} --regid={uid} --clear-groups {caps_args} \"$@\""
    );
    vec!["/bin/sh".into(), "-c".into(), script, "setpriv-wrapper".into()]
}

fn start_wrapped(wrapper: &[String]) -> Broker {
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    settled(Broker::start_with(&[], &wrapper))
}

/// The socket accepts (into its backlog) as soon as it is bound, before the
/// broker drops privileges: wait for the line logged after the drop.
/// The broker has dropped its privileges and installed its seccomp filter
/// (logged in that order, the filter a few lines after the drop).
fn settled(broker: Broker) -> Broker {
    for line in ["privileges restricted to CAP_KILL", "seccomp allow-list installed"] {
        assert!(
            wait_for_log(&broker.log, line, Duration::from_secs(20)),
            "no {line:?} in:\n{}",
            broker.log_text()
        );
    }
    broker
}

#[test]
fn root_by_hand_keeps_only_cap_kill_and_switches_user() {
    let mut broker = settled(Broker::start_with(&["--user", "nobody"], &[]));
    let pid = broker.pid();
    assert_eq!(status_field(pid, "Uid"), "65534");
    assert_eq!(status_field(pid, "Gid"), "65534");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(pid, set), ONLY_CAP_KILL, "{set}\n{}", broker.log_text());
    }
    assert_eq!(status_field(pid, "CapInh"), "0000000000000000");
    assert_eq!(status_field(pid, "CapAmb"), "0000000000000000");
    // The filter goes on after the privilege drop (and the feature probe).
    assert!(wait_for_log(
        &broker.log,
        "seccomp allow-list installed",
        Duration::from_secs(20)
    ));
    assert_eq!(status_field(pid, "Seccomp"), "2", "own seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // A kill-and-reap of another uid's memory, under the broker's filter.
    let mut victim = Victim::spawn(Creds::uid(61041), 32 * MIB);
    let r = broker.reapctl(Creds::ROOT, &["kill", &victim.pid.to_string(), "--wait", "2000"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", broker.log_text());
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
    let released = r.json["bytes_released"].as_u64().unwrap_or(0);
    let outcome = r.json["outcome"].as_str().unwrap_or("");
    assert!(released > 0 || outcome == "exited_before_reap", "{}", r.json);
    assert!(
        broker.alive(),
        "the broker died under its own filter:\n{}",
        broker.log_text()
    );
    let log = broker.log_text();
    assert!(log.contains("seccomp allow-list installed"), "{log}");
    assert!(log.contains("privileges restricted to CAP_KILL"), "{log}");
    assert_eq!(broker.stop(), Some(0), "{}", broker.log_text());
}

#[test]
fn root_without_user_still_drops_everything_but_cap_kill() {
    let broker = settled(Broker::start());
    let pid = broker.pid();
    assert_eq!(status_field(pid, "Uid"), "0");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(pid, set), ONLY_CAP_KILL, "{set}");
    }
}

#[test]
fn unknown_user_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(reapd_e2e::bin("reapd"))
        .arg("--grpc-socket")
        .arg(dir.path().join("g.sock"))
        .args(["--user", "no-such-user-reapd-test"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such user"));
}

#[test]
fn non_root_with_ambient_cap_kill_kills_another_uid() {
    let broker = start_wrapped(&setpriv_wrapper(61042, "+kill"));
    let pid = broker.pid();
    assert_eq!(status_field(pid, "Uid"), "61042");
    assert_eq!(status_field(pid, "CapEff"), ONLY_CAP_KILL, "{}", broker.log_text());
    let caps = broker.reapctl(Creds::uid(61043), &["caps"]);
    assert_eq!(caps.json["has_cap_kill"], true, "{:?}", caps);

    // Caller 61043 kills its own process; the broker (61042) needs CAP_KILL.
    let mut victim = Victim::spawn(Creds::uid(61043), 16 * MIB);
    let r = broker.reapctl(Creds::uid(61043), &["kill", &victim.pid.to_string(), "--wait", "2000"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", broker.log_text());
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
}

#[test]
fn without_cap_kill_cross_uid_kills_are_refused_as_degraded() {
    let mut broker = start_wrapped(&setpriv_wrapper(61044, ""));
    let pid = broker.pid();
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    let caps = broker.reapctl(Creds::uid(61045), &["caps"]);
    assert_eq!(caps.json["has_cap_kill"], false, "{:?}", caps);
    assert!(caps.json["notes"].to_string().contains("degraded"), "{}", caps.json);
    assert!(broker.log_text().contains("DEGRADED MODE"), "{}", broker.log_text());

    // Policy allows 61045 to kill its own process, but the kernel does not
    // let uid 61044 signal it: refused, and the reason says why.
    let victim = Victim::spawn(Creds::uid(61045), 8 * MIB);
    // CheckPermission agrees with what KillAndReap will do.
    let r = broker.reapctl(Creds::uid(61045), &["check", &victim.pid.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.json["reason"].as_str().unwrap_or_default().contains("degraded mode"),
        "{r:?}"
    );
    assert_eq!(r.json["kind"], "degraded", "{r:?}");
    assert_eq!(r.json["rule"], "degraded:no-cap-kill", "{r:?}");
    let r = broker.reapctl(Creds::uid(61045), &["kill", &victim.pid.to_string()]);
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("degraded mode"), "{r:?}");
    assert_eq!(r.json["decision"], "degraded", "{r:?}");
    assert!(victim.running());

    // The broker's own uid still works.
    let mut own = Victim::spawn(Creds::uid(61044), 8 * MIB);
    assert_eq!(
        broker.reapctl(Creds::uid(61044), &["check", &own.pid.to_string()]).code,
        0
    );
    let r = broker.reapctl(Creds::uid(61044), &["kill", &own.pid.to_string(), "--wait", "2000"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", broker.log_text());
    assert_eq!(own.wait(), Some(libc::SIGKILL));
    assert!(broker.alive());
}
