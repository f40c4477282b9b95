// SPDX-License-Identifier: MIT OR Apache-2.0
//! Metrics (issue 14): the broker counts kills by outcome and path, bytes
//! released, refusals by kind, checks, connections, and latency histograms;
//! `reapctl stats` reads them over varlink (`io.systemd.Metrics`) as root
//! or as a `watch` grantee, and nobody else.

use std::process::Command;

use reapd_e2e::{
    bin, metric as sum, policy_file, probe, run_as, start_with_policy, varlink_socket, Broker, Creds, Victim,
};
use serde_json::Value;

const OWNER: u32 = 61950;
const WATCHER: u32 = 61951;
const STRANGER: u32 = 61952;

fn stats(broker: &Broker, creds: Creds, extra: &[&str]) -> (i32, String) {
    let mut command = Command::new(bin("reapctl"));
    command
        .arg("--varlink")
        .arg("--socket")
        .arg(varlink_socket(broker))
        .arg("stats")
        .args(extra);
    let out = run_as(creds, &mut command);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn stats_count_what_happened_and_only_root_and_watchers_read_them() {
    let policy = policy_file(&format!(
        "[[rule]]\nname = \"noc\"\nactions = [\"watch\"]\ncaller.uids = [{WATCHER}]\ntarget.any = true\n"
    ));
    let broker = start_with_policy(&policy);
    let mut released = 0;
    for _ in 0..2 {
        let mut v = Victim::spawn(Creds::uid(OWNER), 2 << 20);
        let r = broker.reapctl(Creds::uid(OWNER), &["kill", &v.pid.to_string()]);
        assert_eq!(r.code, 0, "{r:?}");
        released += r.json["bytes_released"].as_u64().unwrap();
        v.wait();
    }
    let other = Victim::spawn(Creds::uid(OWNER), 0);
    let r = broker.reapctl(Creds::uid(STRANGER), &["kill", &other.pid.to_string()]);
    assert_eq!(r.code, 6, "{r:?}");
    let r = broker.reapctl(Creds::uid(STRANGER), &["check", &other.pid.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");

    let (code, out) = stats(&broker, Creds::ROOT, &[]);
    assert_eq!(code, 0, "{out}");
    let mut command = Command::new(bin("reapctl"));
    command
        .arg("--varlink")
        .arg("--socket")
        .arg(varlink_socket(&broker))
        .arg("--json")
        .arg("stats");
    let out = run_as(Creds::ROOT, &mut command);
    let metrics: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON metrics");
    let path = probe::kill_path();
    assert_eq!(sum(&metrics, "kills_total", &[("path", path)]), 2.0, "{metrics:#?}");
    assert_eq!(sum(&metrics, "kills_total", &[]), 2.0);
    assert_eq!(sum(&metrics, "bytes_released_total", &[]), released as f64);
    assert_eq!(sum(&metrics, "refusals_total", &[("kind", "no_rule")]), 1.0);
    assert_eq!(sum(&metrics, "refusals_total", &[]), 1.0);
    // The check was answered (allowed: false is an answer, not a refusal).
    assert_eq!(sum(&metrics, "checks_total", &[]), 1.0);
    assert_eq!(sum(&metrics, "kill_duration_seconds_count", &[]), 2.0);
    assert_eq!(
        sum(&metrics, "kill_duration_seconds_bucket", &[("le", "+Inf")]),
        2.0,
        "the last bucket holds every observation"
    );
    assert!(sum(&metrics, "connections_accepted_total", &[]) >= 5.0);
    // This stats connection is open while it reads.
    assert!(sum(&metrics, "connections_open", &[]) >= 1.0);

    let (code, out) = stats(&broker, Creds::uid(WATCHER), &[]);
    assert_eq!(code, 0, "a watch grantee reads them: {out}");
    let (code, out) = stats(&broker, Creds::uid(STRANGER), &[]);
    assert_eq!(code, 6, "others may not: {out}");
    assert!(out.contains("watch"), "{out}");
}
