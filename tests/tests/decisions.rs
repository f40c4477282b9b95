// SPDX-License-Identifier: MIT OR Apache-2.0
//! Typed decisions (issue 12): every refusal path carries its kind and the
//! deciding rule, over gRPC (reapctl, which reads the google.rpc.ErrorInfo
//! details) and varlink (error parameters), beside the text.

use reapd_e2e::{policy_file, start_with_policy, varlink_call_as, varlink_socket, Broker, Creds, Victim};

const A: u32 = 61800;
const B: u32 = 61801;
const D: u32 = 61802;

/// (kind, rule) over gRPC via reapctl's JSON error, and over varlink.
fn refusal(broker: &Broker, creds: Creds, pid: i32) -> [(String, String); 2] {
    let r = broker.reapctl(creds, &["kill", &pid.to_string()]);
    assert_ne!(r.code, 0, "{r:?}");
    let grpc = (
        r.json["decision"].as_str().unwrap_or_default().to_string(),
        r.json["rule"].as_str().unwrap_or_default().to_string(),
    );
    let v = varlink_call_as(
        creds,
        &varlink_socket(broker),
        &format!(r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{pid}}}}}"#),
        &[],
    );
    let varlink = (
        v["parameters"]["kind"].as_str().unwrap_or_default().to_string(),
        v["parameters"]["rule"].as_str().unwrap_or_default().to_string(),
    );
    [grpc, varlink]
}

#[test]
fn every_refusal_path_is_typed_on_both_transports() {
    let policy = policy_file(&format!(
        "[[rule]]\nname = \"d-may-not\"\neffect = \"deny\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [{D}]\ntarget.any = true\n"
    ));
    let broker = start_with_policy(&policy);
    let a = Victim::spawn(Creds::uid(A), 0);
    let d_own = Victim::spawn(Creds::uid(D), 0);

    for (kind, rule) in refusal(&broker, Creds::ROOT, 1) {
        assert_eq!((kind.as_str(), rule.as_str()), ("protected", "protect:init"));
    }
    for (kind, rule) in refusal(&broker, Creds::uid(B), a.pid) {
        assert_eq!((kind.as_str(), rule.as_str()), ("no_rule", "no-matching-rule"));
    }
    for (kind, rule) in refusal(&broker, Creds::uid(D), d_own.pid) {
        assert_eq!((kind.as_str(), rule.as_str()), ("denied_by_rule", "d-may-not"));
    }
    // No such process: not_visible over varlink (gRPC's NOT_FOUND carries
    // it in its ErrorInfo, which reapctl reports only for refusals).
    let gone = varlink_call_as(
        Creds::uid(A),
        &varlink_socket(&broker),
        r#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":2147483647}}"#,
        &[],
    );
    assert_eq!(gone["error"], "io.reapd.Reaper.NoSuchProcess", "{gone}");
    assert_eq!(gone["parameters"]["kind"], "not_visible", "{gone}");

    // CheckPermission says the same, allowed ones included.
    let r = broker.reapctl(Creds::uid(A), &["check", &a.pid.to_string()]);
    assert_eq!(
        (r.json["kind"].as_str(), r.json["rule"].as_str()),
        (Some("allowed"), Some("kill(2)")),
        "{r:?}"
    );
    let r = broker.reapctl(Creds::uid(B), &["check", &a.pid.to_string()]);
    assert_eq!(r.json["kind"], "no_rule", "{r:?}");
    assert!(a.running() && d_own.running());
}

#[test]
fn rate_limited_refusals_are_typed() {
    let policy = policy_file("[limits]\nkills = 1\ninterval-secs = 60\nburst = 1\n");
    let broker = start_with_policy(&policy);
    let mut first = Victim::spawn(Creds::uid(A), 0);
    assert_eq!(broker.reapctl(Creds::uid(A), &["kill", &first.pid.to_string()]).code, 0);
    first.wait();
    let second = Victim::spawn(Creds::uid(A), 0);
    let v = varlink_call_as(
        Creds::uid(A),
        &varlink_socket(&broker),
        &format!(
            r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{}}}}}"#,
            second.pid
        ),
        &[],
    );
    assert_eq!(v["error"], "io.reapd.Reaper.RateLimited", "{v}");
    assert_eq!(v["parameters"]["kind"], "rate_limited", "{v}");
    assert!(second.running());
}
