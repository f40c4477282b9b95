// SPDX-License-Identifier: MIT OR Apache-2.0
//! Property tests of the decision function and a fuzz-style test of the
//! parser (the cargo-fuzz target in fuzz/ runs the same entry point longer).

use std::os::fd::OwnedFd;

use proptest::prelude::*;

use super::*;
use crate::os::cgroup::CgroupFacts;

/// Names resolve from a fixed table: tests must not depend on /etc/passwd.
struct Table;

impl Resolver for Table {
    fn user(&self, name: &str) -> Option<u32> {
        match name {
            "root" => Some(0),
            "alice" => Some(1000),
            "oomd" => Some(61000),
            _ => None,
        }
    }
    fn group(&self, name: &str) -> Option<u32> {
        match name {
            "wheel" => Some(10),
            "team-x" => Some(62000),
            _ => None,
        }
    }
}

fn fd() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// Cgroup facts: `path`, of which only `trusted` was root's alone.
fn facts(path: &str, trusted: &str) -> CgroupFacts {
    assert!(matcher::in_subtree(path, trusted));
    CgroupFacts {
        path: path.into(),
        trusted: trusted.into(),
    }
}

fn caller(uid: u32, ruid: Option<u32>, gid: u32, groups: Vec<u32>, cgroup: Option<&str>) -> Caller {
    caller_in(uid, ruid, gid, groups, cgroup.map(|p| facts(p, p)))
}

fn caller_in(uid: u32, ruid: Option<u32>, gid: u32, groups: Vec<u32>, cgroup: Option<CgroupFacts>) -> Caller {
    Caller {
        pid: 4242,
        uid,
        gid,
        real_uid: ruid,
        groups,
        comm: "test".into(),
        cgroup,
        pidns: crate::engine::caller::CallerPidns::Broker,
        userns_capabilities: false,
        cap_kill: uid == 0,
        pidfd: None,
    }
}

fn target(ruid: u32, euid: u32, suid: u32, cgroup: &str, oom: i32) -> TargetProcess {
    target_in(
        ruid,
        euid,
        suid,
        (!cgroup.is_empty()).then(|| facts(cgroup, cgroup)),
        oom,
    )
}

fn target_in(ruid: u32, euid: u32, suid: u32, cgroup: Option<CgroupFacts>, oom: i32) -> TargetProcess {
    TargetProcess {
        pidfd: fd(),
        pid: 5000,
        caller_pid: 5000,
        ruid,
        euid,
        suid,
        gid: ruid,
        comm: "victim".into(),
        start_time: 1,
        cgroup,
        is_kernel_thread: false,
        oom_score_adj: oom,
        memory: None,
        namespaced: None,
    }
}

const BROKER: BrokerFacts = BrokerFacts::with_cap_kill(1234);

fn policy(text: &str) -> Policy {
    compile("test.toml", text, &Table).unwrap_or_else(|e| panic!("{e:?}")).0
}

/// A generated rule, rendered as TOML.
fn rule_strategy() -> impl Strategy<Value = String> {
    let effect = prop_oneof![Just("allow"), Just("deny")];
    let action = prop_oneof![
        Just(r#"["kill-and-reap"]"#),
        Just(r#"["check"]"#),
        Just(r#"["check", "kill-and-reap"]"#),
        Just(r#"["watch"]"#)
    ];
    // Every way the caller index files a rule: by uid (one, a small range),
    // by gid, by cgroup, by exact unit, and unindexed (any, a wide range, a
    // unit glob); and matchers of several fields, filed under one of them.
    let caller = prop_oneof![
        Just("any = true".to_string()),
        (0u32..4).prop_map(|u| format!("uids = [{u}]")),
        (0u32..4, 0u32..3).prop_map(|(lo, w)| format!(r#"uids = ["{lo}-{}"]"#, lo + w)),
        Just(r#"uids = ["0-100000"]"#.to_string()),
        (0u32..4).prop_map(|g| format!("gids = [{}]", 100 + g)),
        Just(r#"cgroups = ["/team"]"#.to_string()),
        Just(r#"cgroups = ["/deleg/team"]"#.to_string()),
        Just(r#"units = ["mon*.service"]"#.to_string()),
        Just(r#"units = ["mon1.service"]"#.to_string()),
        (0u32..4).prop_map(|u| format!(r#"uids = [{u}], cgroups = ["/team"]"#)),
        (0u32..4).prop_map(|g| format!(r#"gids = [{}], units = ["mon1.service"]"#, 100 + g)),
    ];
    let target = prop_oneof![
        Just("any = true".to_string()),
        (0u32..4, 0u32..2).prop_map(|(lo, w)| format!(r#"uids = ["{lo}-{}"]"#, lo + w)),
        Just(r#"cgroups = ["/team/jobs"]"#.to_string()),
        Just(r#"units = ["*.scope"]"#.to_string()),
        (-1000i32..1000).prop_map(|m| format!("oom-score-adj = {{ min = {m} }}")),
        Just(r#"comms = ["vic*"]"#.to_string()),
    ];
    (effect, action, caller, target).prop_map(|(e, a, c, t)| {
        // The compiler refuses comms in deny rules (a process names itself).
        let t = if e == "deny" && t.starts_with("comms") {
            "any = true".to_string()
        } else {
            t
        };
        format!("effect = \"{e}\"\nactions = {a}\ncaller = {{ {c} }}\ntarget = {{ {t} }}\n")
    })
}

fn render(rules: &[String], kill_rule: bool) -> String {
    let mut text = format!("[defaults]\nkill-rule = {kill_rule}\n");
    for (i, r) in rules.iter().enumerate() {
        text.push_str(&format!("[[rule]]\nname = \"r{i}\"\n{r}"));
    }
    text
}

fn creds() -> impl Strategy<Value = (Caller, TargetProcess)> {
    // Paths whose tail lies in a delegated subtree (trusted prefix shorter
    // than the path) stand for what a user could have named itself.
    let cg = prop_oneof![
        Just(None),
        Just(Some(facts("/team", "/team"))),
        Just(Some(facts("/team/mon1.service", "/team/mon1.service"))),
        Just(Some(facts("/team/mon1.service", "/team"))),
        Just(Some(facts("/deleg/team/mon1.service", "/deleg"))),
        Just(Some(facts("/other", "/other")))
    ];
    let tcg = prop_oneof![
        Just(Some(facts("/team/jobs/a.scope", "/team/jobs/a.scope"))),
        Just(Some(facts("/team/jobs/a.scope", "/team"))),
        Just(Some(facts("/other", "/other"))),
        Just(None)
    ];
    (
        0u32..4,
        proptest::option::of(0u32..4),
        proptest::collection::vec(100u32..104, 0..3),
        cg,
        (0u32..4, 0u32..4, 0u32..4),
        tcg,
        -999i32..1000,
    )
        .prop_map(|(uid, ruid, groups, cg, (tr, te, ts), tcg, oom)| {
            (caller_in(uid, ruid, 100, groups, cg), target_in(tr, te, ts, tcg, oom))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The built-in default decides by the kill(2) rule alone: groups,
    /// cgroups and oom_score_adj (above -1000) never change its verdict.
    /// Whether that rule is kill(2) is not asked here (that would type the
    /// formula again): `tests/tests/kill_oracle.rs` compares the default
    /// policy with the running kernel for every credential shape, and the
    /// unit tests beside `kill_rule_allows` check hand-worked cases of
    /// `kill_ok_by_cred()`.
    #[test]
    fn default_decides_by_the_kill_rule_alone((c, t) in creds()) {
        let d = Policy::default().decide(&c, &t, BROKER);
        let creds = KillCreds {
            caller_euid: c.uid,
            caller_ruid: c.real_uid,
            target_ruid: t.ruid,
            target_suid: t.suid,
            caller_cap_kill: c.cap_kill,
        };
        prop_assert_eq!(d.allowed, kill_rule_allows(creds), "{:?}", d);
        prop_assert_eq!(d.rule == "kill(2)", d.allowed, "{:?}", d);
    }

    /// Naming cgroups in a delegated subtree never helps a caller: whatever
    /// it is allowed from there, it is allowed from the subtree's root too,
    /// and a target gains no protection from names below its trusted prefix.
    #[test]
    fn untrusted_cgroup_names_never_grant_nor_protect(
        rules in proptest::collection::vec(rule_strategy(), 0..6),
        kill_rule in any::<bool>(),
        (c, t) in creds(),
    ) {
        let p = policy(&render(&rules, kill_rule));
        let truncate = |cg: &CgroupFacts| facts(&cg.trusted, &cg.trusted);
        let plain_caller = caller_in(c.uid, c.real_uid, c.gid, c.groups.clone(), c.cgroup.as_ref().map(truncate));
        if p.decide(&c, &t, BROKER).allowed {
            prop_assert!(p.decide(&plain_caller, &t, BROKER).allowed);
        }
        let plain_target = target_in(t.ruid, t.euid, t.suid, t.cgroup.as_ref().map(truncate), t.oom_score_adj);
        prop_assert_eq!(p.decide(&c, &t, BROKER), p.decide(&c, &plain_target, BROKER));
    }

    /// The caller index never drops a rule. Differential: every decision
    /// made through the index (kill, check, watch, metrics) equals the one
    /// made by a brute-force scan of all rules, rule and reason included;
    /// and directly: every rule whose caller matcher matches this caller,
    /// in either mode, is among the index's candidates (a dropped rule
    /// fails here even where another rule happens to give the same
    /// verdict).
    #[test]
    fn caller_index_equals_brute_force(
        rules in proptest::collection::vec(rule_strategy(), 0..12),
        kill_rule in any::<bool>(),
        (c, t) in creds(),
    ) {
        let indexed = policy(&render(&rules, kill_rule));
        let mut brute = indexed.clone();
        brute.index = CallerIndex {
            unindexed: (0..brute.rules.len() as u32).collect(),
            ..CallerIndex::default()
        };
        prop_assert_eq!(indexed.decide(&c, &t, BROKER), brute.decide(&c, &t, BROKER));
        prop_assert_eq!(indexed.check_refusal(&c, &t), brute.check_refusal(&c, &t));
        prop_assert_eq!(indexed.watch_grant(&c, &t), brute.watch_grant(&c, &t));
        prop_assert_eq!(indexed.metrics_grant(&c), brute.metrics_grant(&c));
        let candidates = indexed.index.candidates(&c);
        for (i, rule) in indexed.rules.iter().enumerate() {
            for mode in [Mode::Allow, Mode::Deny] {
                prop_assert!(
                    !rule.caller.matches(&c, mode) || candidates.contains(&(i as u32)),
                    "rule {} ({:?}) matches {:?} in {:?} mode but is not a candidate: {:?}",
                    rule.name, rule.caller, c, mode, candidates
                );
            }
        }
    }

    /// Degraded mode (no CAP_KILL) only ever refuses more, and never allows
    /// a kill of a process the broker's own uids could not signal.
    #[test]
    fn degraded_mode_only_refuses_what_the_kernel_would(
        rules in proptest::collection::vec(rule_strategy(), 0..6),
        kill_rule in any::<bool>(),
        own in (0u32..4, 0u32..4),
        (c, t) in creds(),
    ) {
        let p = policy(&render(&rules, kill_rule));
        let degraded = BrokerFacts { pid: 1234, cap_kill: false, own_uids: [own.0, own.1] };
        let d = p.decide(&c, &t, degraded);
        let full = p.decide(&c, &t, BROKER);
        if d.allowed {
            prop_assert!(full.allowed);
            prop_assert!([own.0, own.1].iter().any(|u| *u == t.ruid || *u == t.suid));
        } else if full.allowed {
            prop_assert_eq!(d.rule, "degraded:no-cap-kill");
        }
    }

    /// Adding a deny rule never allows more, for kill or check.
    #[test]
    fn deny_never_allows_more(
        rules in proptest::collection::vec(rule_strategy(), 0..6),
        deny in rule_strategy(),
        kill_rule in any::<bool>(),
        (c, t) in creds(),
    ) {
        let before = policy(&render(&rules, kill_rule));
        let deny = deny
            .replacen("effect = \"allow\"", "effect = \"deny\"", 1)
            .replace(r#"comms = ["vic*"]"#, "any = true");
        let mut more = rules.clone();
        more.push(deny);
        let after = policy(&render(&more, kill_rule));
        prop_assert!(!after.decide(&c, &t, BROKER).allowed || before.decide(&c, &t, BROKER).allowed);
        prop_assert!(after.check_refusal(&c, &t).is_some() || before.check_refusal(&c, &t).is_none());
    }

    /// Reordering rules changes neither the decision nor its explanation.
    #[test]
    fn order_never_matters(
        rules in proptest::collection::vec(rule_strategy(), 1..8),
        seed in any::<u64>(),
        kill_rule in any::<bool>(),
        (c, t) in creds(),
    ) {
        // Names travel with their rule, so render names first, then shuffle.
        let named: Vec<String> = rules.iter().enumerate().map(|(i, r)| format!("[[rule]]\nname = \"r{i}\"\n{r}")).collect();
        let mut shuffled = named.clone();
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let head = format!("[defaults]\nkill-rule = {kill_rule}\n");
        let a = policy(&(head.clone() + &named.concat()));
        let b = policy(&(head + &shuffled.concat()));
        prop_assert_eq!(a.decide(&c, &t, BROKER), b.decide(&c, &t, BROKER));
        prop_assert_eq!(a.check_refusal(&c, &t), b.check_refusal(&c, &t));
    }

    /// The parser never panics on arbitrary text, and every error it
    /// reports has a position inside the file.
    #[test]
    fn parser_never_panics_on_random_text(text in "\\PC{0,400}") {
        check_parse(&text);
    }

    /// Mutations of a valid file: splice random bytes in.
    #[test]
    fn parser_never_panics_on_mutated_files(
        at in 0usize..2000,
        cut in 0usize..8,
        insert in "[\\[\\]{}=\"'\\-., a-z0-9\\n#*?]{0,12}",
    ) {
        let base = SAMPLE;
        let at = at % (base.len() + 1);
        let mut at = at;
        while !base.is_char_boundary(at) { at -= 1; }
        let mut end = (at + cut).min(base.len());
        while !base.is_char_boundary(end) { end -= 1; }
        let text = format!("{}{}{}", &base[..at], insert, &base[end..]);
        check_parse(&text);
    }
}

/// The parser's contract, shared with the cargo-fuzz target.
fn check_parse(text: &str) {
    match compile("fuzz.toml", text, &Table) {
        Ok(_) => {}
        Err(errors) => {
            assert!(!errors.is_empty());
            let lines = text.split('\n').count();
            for e in errors {
                assert!(e.line >= 1 && e.line <= lines.max(1), "{e} beyond {lines} lines");
                assert!(e.col >= 1);
            }
        }
    }
}

const SAMPLE: &str = r#"
[defaults]
kill-rule = false
check = "granted"

[protect]
users = ["root"]
uids = ["1-999"]
cgroups = ["system.slice/sshd.service"]
units = ["systemd-*.service"]

[limits]
kills = 10
interval-secs = 2.5
burst = 5
max-in-flight = 3

[[rule]]
name = "oomd-kills-users"
actions = ["kill-and-reap"]
caller.users = ["oomd"]
target.uids = ["1000-59999"]
target.cgroups = ["user.slice"]

[[rule]]
name = "team-x"
actions = ["kill-and-reap", "check"]
caller = { groups = ["team-x"], cgroups = ["/team"] }
target = { uids = [62001], units = ["job-*.scope"], oom-score-adj = { min = 0, max = 1000 } }

[[rule]]
name = "nobody-kills-root"
effect = "deny"
actions = ["kill-and-reap"]
caller.any = true
target.users = ["root"]
"#;

#[test]
fn sample_compiles_and_decides() {
    let (p, limits) = compile("sample.toml", SAMPLE, &Table).unwrap();
    assert_eq!(p.rules().len(), 3);
    assert!(!p.kill_rule);
    assert_eq!(limits.burst, 5);
    assert!((limits.kills_per_second - 4.0).abs() < 1e-9);
    let oomd = caller(61000, Some(61000), 61000, vec![], Some("/system.slice/oomd.service"));
    let user = target(1000, 1000, 1000, "/user.slice/user-1000.slice/session-1.scope", 0);
    let d = p.decide(&oomd, &user, BROKER);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.rule, "oomd-kills-users");
    // A setuid-root process run by the user is not the user's to grant.
    let setuid = target(1000, 0, 0, "/user.slice/user-1000.slice/session-1.scope", 0);
    let d = p.decide(&oomd, &setuid, BROKER);
    assert!(!d.allowed);
    assert_eq!(d.rule, "protect:uid 0");
    // Team X: group AND cgroup; no verified cgroup, no match.
    let job = target(62001, 62001, 62001, "/team/jobs/job-7.scope", 10);
    let member = caller(61001, None, 61001, vec![62000], Some("/team/mon.service"));
    assert_eq!(p.decide(&member, &job, BROKER).rule, "team-x");
    let unverified = caller(61001, None, 61001, vec![62000], None);
    assert!(!p.decide(&unverified, &job, BROKER).allowed);
    // check = "granted": the unverified caller may not even ask.
    assert!(p.check_refusal(&unverified, &job).is_some());
    assert!(p.check_refusal(&member, &job).is_none());
    // oom_score_adj -1000 is protected by default.
    let never = target(62001, 62001, 62001, "/team/jobs/job-7.scope", -1000);
    assert_eq!(p.decide(&member, &never, BROKER).rule, "protect:oom-score-adj");
}

#[test]
fn positions_point_at_the_problem() {
    let text = "[[rule]]\nname = \"a\"\nactions = [\"check\"]\ncaller.users = [\"nosuch\"]\ntarget.any = true\n";
    let errs = compile("p.toml", text, &Table).unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "p.toml:4:17: unknown user \"nosuch\" (not found through NSS)"
    );
}

#[test]
fn many_rules_compile_and_index() {
    let mut text = String::from("[defaults]\nkill-rule = false\n");
    for i in 0..2000 {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [{}]\ntarget.uids = [{}]\n",
            61000 + i,
            62000 + i
        ));
    }
    let p = policy(&text);
    let c = caller(61500, None, 1, vec![], None);
    assert_eq!(
        p.index.candidates(&c),
        vec![p.rules().iter().position(|r| r.name == "r500").unwrap() as u32]
    );
    assert!(p.decide(&c, &target(62500, 62500, 62500, "/x", 0), BROKER).allowed);
    assert!(!p.decide(&c, &target(62501, 62501, 62501, "/x", 0), BROKER).allowed);
}
