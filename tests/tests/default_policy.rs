// SPDX-License-Identifier: MIT OR Apache-2.0
//! The policy file the package ships (systemd/policy.toml) is valid and
//! decides exactly as the built-in default does.

use std::path::PathBuf;

use reapd_e2e::{bin, Broker, Creds, Victim};

fn shipped_policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/policy.toml")
}

#[test]
fn the_shipped_policy_is_valid() {
    let out = std::process::Command::new(bin("reapd"))
        .arg("check-policy")
        .arg(shipped_policy())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_shipped_policy_decides_as_the_built_in_default() {
    let policy = shipped_policy();
    let shipped = Broker::start_with(&["--policy", policy.to_str().unwrap()], &[]);
    let built_in = Broker::start();
    let targets = [Creds::uid(61051), Creds::uids(61052, 61051, 61051), Creds::uid(0)];
    let callers = [
        Creds::uid(61051),
        Creds::uid(61052),
        Creds::ROOT,
        Creds::uids(61051, 61053, 61053),
    ];
    let victims: Vec<Victim> = targets.iter().map(|t| Victim::spawn(*t, 0)).collect();
    for caller in callers {
        for victim in &victims {
            let pid = victim.pid.to_string();
            let a = shipped.reapctl(caller, &["check", &pid]);
            let b = built_in.reapctl(caller, &["check", &pid]);
            assert_eq!(
                (a.code, &a.json["reason"]),
                (b.code, &b.json["reason"]),
                "caller {caller:?}"
            );
        }
    }
    for pid in [1, shipped.pid()] {
        assert_eq!(shipped.reapctl(Creds::ROOT, &["check", &pid.to_string()]).code, 1);
    }
}
