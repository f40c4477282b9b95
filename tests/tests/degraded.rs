// SPDX-License-Identifier: MIT OR Apache-2.0
//! Older kernels and rare errors, for real: the broker runs under a seccomp
//! filter that makes one call fail with one errno, and must degrade (or
//! retry) as documented and say so in GetCapabilities.

use std::time::Duration;

use reapd_e2e::{bin, kernel_allows_kill, wait_for_log, Broker, Creds, Victim};

const A: u32 = 61011;
const B: u32 = 61012;
const MIB: usize = 1 << 20;

fn broker_with(rule: &str) -> Broker {
    let wrapper = bin("seccomp-errno");
    let wrapper = wrapper.to_str().unwrap();
    Broker::start_with(&[], &[wrapper, rule, "--"])
}

fn kill_as(broker: &Broker, creds: Creds, victim: &Victim) -> reapd_e2e::CtlResult {
    broker.reapctl(creds, &["kill", &victim.pid.to_string(), "--wait", "2000"])
}

#[test]
fn without_process_mrelease_the_broker_kills_and_says_it_did_not_reap() {
    let broker = broker_with("process_mrelease=ENOSYS");
    let caps = broker.reapctl(Creds::uid(A), &["caps"]);
    assert_eq!(caps.json["process_mrelease"], false, "{:?}", caps.json);
    assert_eq!(caps.json["kill_path"], "kill_only");
    assert!(caps.json["notes"].to_string().contains("ENOSYS"));
    let mut victim = Victim::spawn(Creds::uid(A), 8 * MIB);
    let r = kill_as(&broker, Creds::uid(A), &victim);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json["outcome"], "killed_not_reaped");
    assert_eq!(r.json["kill_path"], "kill_only");
    assert!(r.json["not_reaped_reason"]
        .as_str()
        .unwrap()
        .contains("no process_mrelease"));
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
}

#[test]
fn unsupported_reap_kill_flag_means_two_calls() {
    let broker = broker_with("process_mrelease_flag=EINVAL");
    let caps = broker.reapctl(Creds::uid(A), &["caps"]);
    assert_eq!(caps.json["process_mrelease"], true);
    assert_eq!(caps.json["reap_kill_flag"], false);
    assert_eq!(caps.json["kill_path"], "kill_then_mrelease");
    let mut victim = Victim::spawn(Creds::uid(A), 8 * MIB);
    let r = kill_as(&broker, Creds::uid(A), &victim);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json["kill_path"], "kill_then_mrelease");
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
}

#[test]
fn a_reap_kill_flag_that_fails_at_use_falls_back_to_kill_then_reap() {
    // The probe says "supported" (EBADF), the real call fails: the broker
    // must still kill and reap, and report the path it really took.
    let broker = broker_with("process_mrelease_flag=EBADF");
    let caps = broker.reapctl(Creds::uid(A), &["caps"]);
    assert_eq!(caps.json["reap_kill_flag"], true, "{:?}", caps.json);
    assert_eq!(caps.json["kill_path"], "reap_kill");
    let mut victim = Victim::spawn(Creds::uid(A), 8 * MIB);
    let r = kill_as(&broker, Creds::uid(A), &victim);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json["kill_path"], "kill_then_mrelease");
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
}

#[test]
fn without_pidfd_get_info_credentials_come_from_proc_and_still_agree_with_kill_2() {
    let broker = broker_with("pidfd_get_info=ENOTTY");
    let caps = broker.reapctl(Creds::uid(A), &["caps"]);
    assert_eq!(caps.json["pidfd_get_info"], false, "{:?}", caps.json);
    assert!(caps.json["notes"].to_string().contains("ENOTTY"));
    let targets = [
        Creds::uids(A, A, A),
        Creds::uids(B, A, A),
        Creds::uids(B, B, A),
        Creds::uids(A, 0, 0),
    ];
    let callers = [Creds::uids(A, A, A), Creds::uids(B, B, B), Creds::uids(A, B, B)];
    for target in targets {
        let victim = Victim::spawn(target, 0);
        for caller in callers {
            let oracle = kernel_allows_kill(caller, victim.pid);
            let r = broker.reapctl(caller, &["check", &victim.pid.to_string()]);
            assert_eq!(r.code == 0, oracle, "caller {caller:?} target {target:?}: {r:?}");
        }
    }
    let mut victim = Victim::spawn(Creds::uid(A), 8 * MIB);
    assert_eq!(kill_as(&broker, Creds::uid(A), &victim).code, 0);
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
}

#[test]
fn without_so_peerpidfd_only_the_effective_uid_counts() {
    let broker = broker_with("so_peerpidfd=ENOPROTOOPT");
    let caps = broker.reapctl(Creds::uid(A), &["caps"]);
    assert_eq!(caps.json["so_peerpidfd"], false, "{:?}", caps.json);
    assert!(caps.json["notes"].to_string().contains("ENOPROTOOPT"));
    // Same euid: still allowed.
    let mut victim = Victim::spawn(Creds::uid(A), 0);
    assert_eq!(kill_as(&broker, Creds::uid(A), &victim).code, 0);
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
    // Real uid A, effective B: the kernel would allow a kill of A's process,
    // but without a pidfd the broker cannot read the real uid reliably, so
    // it refuses (the documented conservative degradation).
    let victim = Victim::spawn(Creds::uid(A), 0);
    let caller = Creds::uids(A, B, B);
    assert!(kernel_allows_kill(caller, victim.pid));
    let r = broker.reapctl(caller, &["check", &victim.pid.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(victim.running());
}

#[test]
fn a_contended_reap_is_retried_then_reported() {
    let broker = broker_with("process_mrelease_plain=EAGAIN");
    let caps = broker.reapctl(Creds::uid(A), &["caps"]);
    // The probe (fd -1) is not affected.
    assert_eq!(caps.json["process_mrelease"], true, "{:?}", caps.json);
    let mut victim = Victim::spawn(Creds::uid(A), 8 * MIB);
    let r = kill_as(&broker, Creds::uid(A), &victim);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json["outcome"], "killed_not_reaped");
    assert_eq!(r.json["reap_retries"], 10);
    assert!(r.json["not_reaped_reason"].as_str().unwrap().contains("contended"));
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
    assert!(wait_for_log(&broker.log, "reap_retries=10", Duration::from_secs(2)));
}
