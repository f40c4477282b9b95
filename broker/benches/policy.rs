// SPDX-License-Identifier: MIT OR Apache-2.0
//! Cost of one policy decision with 10 and with 10,000 rules.
//!
//! Rules name distinct callers (as per-team or per-service grants do), plus
//! a few rules every caller must be checked against (a deny over root's
//! processes, a check grant to a group). The index makes the per-decision
//! cost independent of the rules for other callers.
//!
//! `cargo bench -p reapd --bench policy`

use std::os::fd::OwnedFd;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use reapd::engine::caller::{Caller, CallerPidns};
use reapd::engine::policy::{compile, BrokerFacts, Resolver};
use reapd::engine::target::TargetProcess;
use reapd::os::cgroup::CgroupFacts;

struct NoNames;

impl Resolver for NoNames {
    fn user(&self, _: &str) -> Option<u32> {
        None
    }
    fn group(&self, _: &str) -> Option<u32> {
        None
    }
}

fn policy_text(rules: usize) -> String {
    let mut text = String::from(
        r#"[defaults]
kill-rule = false

[protect]
cgroups = ["system.slice/sshd.service"]

[[rule]]
name = "nobody-kills-root"
effect = "deny"
actions = ["kill-and-reap"]
caller.any = true
target.uids = [0]

[[rule]]
name = "ops-may-check"
actions = ["check"]
caller.gids = [4000]
target.any = true
"#,
    );
    for i in 0..rules.saturating_sub(2) {
        text.push_str(&format!(
            "[[rule]]\nname = \"team-{i}\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [{}]\ntarget.uids = [\"{}-{}\"]\ntarget.cgroups = [\"team.slice/team-{i}.slice\"]\n",
            100_000 + i,
            200_000 + i * 10,
            200_000 + i * 10 + 9
        ));
    }
    text
}

fn caller(uid: u32) -> Caller {
    Caller {
        pid: 4242,
        uid,
        gid: uid,
        real_uid: Some(uid),
        groups: vec![100, 4000],
        comm: "bench".into(),
        cgroup: Some(CgroupFacts {
            path: "/system.slice/monitor.service".into(),
            trusted: "/system.slice/monitor.service".into(),
        }),
        pidns: CallerPidns::Broker,
        userns_capabilities: false,
        cap_kill: uid == 0,
        pidfd: None,
    }
}

fn target(uid: u32, cgroup: &str) -> TargetProcess {
    let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    TargetProcess {
        pidfd: fd,
        pid: 5000,
        caller_pid: 5000,
        ruid: uid,
        euid: uid,
        suid: uid,
        gid: uid,
        comm: "job".into(),
        start_time: 1,
        cgroup: Some(CgroupFacts {
            path: cgroup.into(),
            trusted: cgroup.into(),
        }),
        is_kernel_thread: false,
        oom_score_adj: 0,
        memory: None,
        namespaced: None,
    }
}

fn bench(c: &mut Criterion) {
    let broker = BrokerFacts::with_cap_kill(1 << 30);
    let mut group = c.benchmark_group("decide");
    for rules in [10usize, 10_000] {
        let (policy, _) = compile("bench.toml", &policy_text(rules), &NoNames).expect("bench policy compiles");
        // A caller whose own rule allows (the rule in the middle).
        let i = (rules - 2) / 2;
        let allowed_caller = caller(100_000 + i as u32);
        let allowed_target = target(
            200_000 + i as u32 * 10 + 3,
            &format!("/team.slice/team-{i}.slice/job.scope"),
        );
        assert!(policy.decide(&allowed_caller, &allowed_target, broker).allowed);
        group.bench_with_input(BenchmarkId::new("allowed", rules), &rules, |b, _| {
            b.iter(|| policy.decide(&allowed_caller, &allowed_target, broker))
        });
        // A caller with no rule: refused after looking at everything that
        // could apply.
        let stranger = caller(99);
        assert!(!policy.decide(&stranger, &allowed_target, broker).allowed);
        group.bench_with_input(BenchmarkId::new("refused", rules), &rules, |b, _| {
            b.iter(|| policy.decide(&stranger, &allowed_target, broker))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
