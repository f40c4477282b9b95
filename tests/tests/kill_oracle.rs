// SPDX-License-Identifier: MIT OR Apache-2.0
//! The built-in default policy against the kernel itself: for every
//! credential shape over an alphabet of uids, the broker's identification
//! of a real caller and a real target, decided by `Policy::default()`,
//! equals what kill(2) answers for the same credentials. The oracle is the
//! running kernel (`kill(pid, 0)` from a child that took the caller's
//! credentials), not a formula typed again in the test.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;

use reapd::engine::caller::Caller;
use reapd::engine::policy::{BrokerFacts, Policy};
use reapd::engine::target::{pin, Namespace, TargetSpec};
use reapd::os::features::KernelFeatures;
use reapd_e2e::{kernel_allows_kill_each, Creds, Victim};

/// Root and three users: enough values for every pattern of equalities
/// among the four uids kill(2) compares (the caller's effective and real,
/// the target's real and saved), each with or without root among them.
const UIDS: [u32; 4] = [0, 61701, 61702, 61703];

/// Every (real, effective, saved) uid triple over [`UIDS`]: 64 shapes.
fn shapes() -> Vec<Creds> {
    let mut out = Vec::new();
    for r in UIDS {
        for e in UIDS {
            for s in UIDS {
                out.push(Creds::uids(r, e, s));
            }
        }
    }
    out
}

#[test]
fn default_policy_decides_as_the_kernel_for_every_credential_shape() {
    let features = KernelFeatures::probe();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = dir.path().join("callers.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();

    let targets: Vec<(Creds, Victim)> = shapes().into_iter().map(|c| (c, Victim::spawn(c, 0))).collect();
    let pids: Vec<i32> = targets.iter().map(|(_, v)| v.pid).collect();
    // As the broker would: the test process stands in for it (its pid is
    // protected; no target is the test process).
    let broker = BrokerFacts::with_cap_kill(std::process::id() as i32);
    let policy = Policy::default();

    let (mut cases, mut allowed, mut mismatches) = (0, 0, Vec::new());
    for caller_creds in shapes() {
        // A live caller with these credentials, connected to us: identified
        // the way the broker identifies every peer.
        let caller_process = Victim::spawn_connected(caller_creds, &path);
        let (stream, _) = listener.accept().unwrap();
        let caller = Caller::from_socket(stream.as_fd(), &features).expect("identify the caller");
        assert_eq!(caller.pid, caller_process.pid);
        // The oracle: kill(pid, 0) with the same credentials.
        let kernel = kernel_allows_kill_each(caller_creds, &pids);
        for ((target_creds, victim), kernel) in targets.iter().zip(kernel) {
            let target = pin(
                TargetSpec::Pid {
                    pid: victim.pid,
                    start_time: None,
                },
                Namespace::Broker,
                &features,
                false,
            )
            .expect("pin a live victim");
            let decision = policy.decide(&caller, &target, broker);
            if decision.allowed != kernel {
                mismatches.push(format!(
                    "caller {caller_creds:?} target {target_creds:?}: kernel {kernel}, policy {decision:?}"
                ));
            }
            cases += 1;
            allowed += usize::from(kernel);
        }
    }
    assert!(targets.iter().all(|(_, v)| v.running()), "a check killed a target");
    assert!(
        mismatches.is_empty(),
        "{} of {cases} disagree with kill(2):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // Both verdicts occur often: the oracle is not trivially one-sided.
    assert!(
        allowed > cases / 8 && allowed < cases * 7 / 8,
        "{allowed} of {cases} allowed"
    );
    eprintln!("{cases} caller x target credential shapes agree with kill(2); {allowed} allowed");
}
