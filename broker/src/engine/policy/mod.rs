// SPDX-License-Identifier: MIT OR Apache-2.0
//! May this caller kill this target? (See `docs/policy.md` for the file
//! format and the exact semantics.)
//!
//! The decision is a pure function of the caller's kernel-given identity,
//! the pinned target's facts and the compiled policy. For kill-and-reap:
//! 1. **Protected** targets are refused for every caller, root included
//!    (pid 1, kernel threads, the broker, oom_score_adj -1000 unless switched
//!    off, and whatever the file's `protect` section names).
//! 2. A matching **deny** rule refuses. Deny wins over every allow,
//!    including the kill(2) rule.
//! 3. The **kill(2) rule** (on by default, can be switched off): allowed iff
//!    the caller's effective or real uid equals the target's real or saved
//!    uid, or the caller is root holding CAP_KILL — exactly
//!    `kill_ok_by_cred()` in `kernel/signal.c` (uid 0 without CAP_KILL is
//!    an ordinary uid to it).
//! 4. A matching **allow** rule allows.
//! 5. Nothing matched: refused, with the reason.
//!
//! Rules are kept sorted by their (unique) name and every "which rule" choice
//! takes the first by name, so the order of rules in the file never changes
//! a decision nor its explanation. Every decision names the rule or
//! protection that decided it.

pub mod compile;
pub mod file;
pub mod matcher;

use std::collections::HashMap;

pub use compile::{compile, load_file, LoadError, Nss, PolicyError, Resolver};
use matcher::{units_on_path, CallerMatch, Mode, Protected, TargetMatch};

use serde::Serialize;

use crate::engine::caller::Caller;
use crate::engine::target::TargetProcess;

pub use reapd_proto::model::DecisionKind;

/// The verdict and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The verdict's kind, `Allowed` iff `allowed`.
    pub kind: DecisionKind,
    /// Short name of what decided: a rule name, a protection, or
    /// "no-matching-rule".
    pub rule: String,
    /// One sentence a person can read.
    pub reason: String,
}

/// Facts about the broker itself that the policy needs.
#[derive(Debug, Clone, Copy)]
pub struct BrokerFacts {
    /// The broker's own pid (protected).
    pub pid: i32,
    /// The broker holds CAP_KILL. Without it (degraded mode) the kernel lets
    /// it signal only processes whose real or saved uid is one of
    /// `own_uids`, so a kill the rules allow may still be impossible.
    pub cap_kill: bool,
    /// The broker's real and effective uid, read once after any `--user`
    /// switch.
    pub own_uids: [u32; 2],
}

impl BrokerFacts {
    /// A broker with CAP_KILL (for tests and benchmarks).
    pub const fn with_cap_kill(pid: i32) -> Self {
        BrokerFacts {
            pid,
            cap_kill: true,
            own_uids: [0, 0],
        }
    }
}

/// The credentials `kill_ok_by_cred()` compares, for the pure rule below
/// (and its property tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillCreds {
    pub caller_euid: u32,
    pub caller_ruid: Option<u32>,
    pub target_ruid: u32,
    pub target_suid: u32,
    /// The caller is uid 0 and holds CAP_KILL.
    pub caller_cap_kill: bool,
}

/// The kernel's kill(2) permission rule for an unprivileged sender: allowed
/// iff the caller's euid or uid equals the target's uid or suid; root with
/// CAP_KILL may kill anything.
pub fn kill_rule_allows(creds: KillCreds) -> bool {
    let caller = std::iter::once(creds.caller_euid).chain(creds.caller_ruid);
    (creds.caller_euid == 0 && creds.caller_cap_kill)
        || caller
            .into_iter()
            .any(|uid| uid == creds.target_ruid || uid == creds.target_suid)
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// Refuses instead of granting.
    pub deny: bool,
    /// Applies to kill-and-reap.
    pub kill: bool,
    /// Applies to check.
    pub check: bool,
    /// Applies to kill events (`WatchKills`): an allow rule lets the caller
    /// see events of kills of the targets it matches; a deny rule hides them.
    pub watch: bool,
    pub caller: CallerMatch,
    pub target: TargetMatch,
}

/// Rule indexes by what the caller's matcher names, so a decision looks at
/// the few rules that can match this caller instead of all of them. A rule
/// sits in exactly one index (its most selective field); rules with nothing
/// indexable sit in `unindexed` and are looked at for every caller.
#[derive(Debug, Clone, Default)]
struct CallerIndex {
    by_uid: HashMap<u32, Vec<u32>>,
    by_gid: HashMap<u32, Vec<u32>>,
    by_cgroup: HashMap<String, Vec<u32>>,
    by_unit: HashMap<String, Vec<u32>>,
    unindexed: Vec<u32>,
}

/// Id ranges up to this size are indexed id by id; wider ones go unindexed.
const MAX_EXPANDED_RANGE: u32 = 256;

impl CallerIndex {
    fn build(rules: &[Rule]) -> Self {
        let mut index = CallerIndex::default();
        let small = |spans: &[matcher::IdSpan]| {
            !spans.is_empty()
                && spans.iter().map(|s| u64::from(s.hi - s.lo) + 1).sum::<u64>() <= u64::from(MAX_EXPANDED_RANGE)
        };
        for (i, rule) in rules.iter().enumerate() {
            let i = i as u32;
            let c = &rule.caller;
            if c.any {
                index.unindexed.push(i);
            } else if small(&c.uids) {
                for span in &c.uids {
                    for id in span.lo..=span.hi {
                        index.by_uid.entry(id).or_default().push(i);
                    }
                }
            } else if small(&c.gids) {
                for span in &c.gids {
                    for id in span.lo..=span.hi {
                        index.by_gid.entry(id).or_default().push(i);
                    }
                }
            } else if !c.cgroups.is_empty() {
                for path in &c.cgroups {
                    index.by_cgroup.entry(path.clone()).or_default().push(i);
                }
            } else if !c.units.is_empty() && c.units.iter().all(|g| !g.text.contains(['*', '?', '[', '{', '\\'])) {
                for glob in &c.units {
                    index.by_unit.entry(glob.text.clone()).or_default().push(i);
                }
            } else {
                index.unindexed.push(i);
            }
        }
        index
    }

    /// Indexes of the rules that may match `caller`, sorted, without repeats.
    fn candidates(&self, caller: &Caller) -> Vec<u32> {
        let mut out: Vec<u32> = self.unindexed.clone();
        let mut add = |list: Option<&Vec<u32>>| {
            if let Some(list) = list {
                out.extend_from_slice(list);
            }
        };
        add(self.by_uid.get(&caller.uid));
        for gid in caller.all_groups() {
            add(self.by_gid.get(&gid));
        }
        match caller.cgroup.as_ref() {
            Some(cg) => {
                if !self.by_cgroup.is_empty() {
                    // The cgroup and each of its ancestors, up to "/": the
                    // full path for deny rules, and the trusted prefix that
                    // grants read is one of these ancestors.
                    let mut path = cg.path.as_str();
                    loop {
                        add(self.by_cgroup.get(path));
                        match path.rfind('/') {
                            Some(0) if path.len() > 1 => path = "/",
                            Some(0) | None => break,
                            Some(i) => path = &path[..i],
                        }
                    }
                }
                for unit in units_on_path(&cg.path) {
                    add(self.by_unit.get(unit));
                }
            }
            None => {
                // Unverified: every deny rule on the caller's cgroup applies,
                // so every rule that reads it is a candidate.
                for list in self.by_cgroup.values().chain(self.by_unit.values()) {
                    out.extend_from_slice(list);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The compiled policy. `Policy::default()` is the built-in default: the
/// kill(2) rule, the fixed protections, oom_score_adj -1000 protected,
/// anyone may check.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The kill(2)-equivalent default rule is on.
    pub kill_rule: bool,
    /// Anyone may ask CheckPermission about any process (`check = "anyone"`);
    /// otherwise a caller needs a `check` or `kill-and-reap` grant.
    pub check_anyone: bool,
    /// Protect processes with oom_score_adj -1000.
    pub protect_oom_min: bool,
    /// How long a killed process may run its own exit path before the
    /// broker reaps it, unless a request says otherwise
    /// (`[defaults] reap-delay-ms`; zero: reap at once).
    pub reap_delay: std::time::Duration,
    /// What the `protect` section names, sorted by label.
    pub protected: Vec<Protected>,
    /// Sorted by name (names are unique).
    rules: Vec<Rule>,
    index: CallerIndex,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            kill_rule: true,
            check_anyone: true,
            protect_oom_min: true,
            reap_delay: std::time::Duration::ZERO,
            protected: Vec::new(),
            rules: Vec::new(),
            index: CallerIndex::default(),
        }
    }
}

/// Which operation a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    KillAndReap,
    Check,
    Watch,
}

impl Policy {
    /// Installs `rules` (sorted by name, so file order never matters) and
    /// builds their indexes.
    pub fn set_rules(&mut self, mut rules: Vec<Rule>) {
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        self.index = CallerIndex::build(&rules);
        self.rules = rules;
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first rule by name that matches for `action` with effect `deny`.
    fn first_match(
        &self,
        candidates: &[u32],
        caller: &Caller,
        target: &TargetProcess,
        action: Action,
        deny: bool,
    ) -> Option<&Rule> {
        let mode = if deny { Mode::Deny } else { Mode::Allow };
        candidates
            .iter()
            .map(|i| &self.rules[*i as usize])
            .filter(|r| r.deny == deny)
            .filter(|r| match action {
                Action::KillAndReap => r.kill,
                // For check, an allow of kill-and-reap implies check; a deny
                // of kill-and-reap does not forbid asking.
                Action::Check => r.check || (!deny && r.kill),
                Action::Watch => r.watch,
            })
            .find(|r| r.caller.matches(caller, mode) && r.target.matches(target, mode))
    }

    /// Would kill-and-reap be allowed, and why: the rules' decision, refined
    /// by what the kernel will let the broker do. In degraded mode (no
    /// CAP_KILL) an allowed kill of a process the broker's own uids cannot
    /// signal is refused here, so CheckPermission and KillAndReap agree.
    pub fn decide(&self, caller: &Caller, target: &TargetProcess, broker: BrokerFacts) -> Decision {
        let decision = self.decide_rules(caller, target, broker);
        if !decision.allowed
            || broker.cap_kill
            || broker
                .own_uids
                .iter()
                .any(|uid| *uid == target.ruid || *uid == target.suid)
        {
            return decision;
        }
        Decision {
            kind: DecisionKind::Degraded,
            allowed: false,
            rule: "degraded:no-cap-kill".into(),
            reason: format!(
                "the policy allows it ({}), but the broker runs without CAP_KILL (degraded mode) and the kernel \
                 lets it kill only its own uid's processes, not uid {}",
                decision.rule, target.ruid
            ),
        }
    }

    fn decide_rules(&self, caller: &Caller, target: &TargetProcess, broker: BrokerFacts) -> Decision {
        if let Some(protection) = self.protection(target, broker) {
            return Decision {
                kind: DecisionKind::Protected,
                allowed: false,
                rule: protection.0,
                reason: protection.1,
            };
        }
        let candidates = self.index.candidates(caller);
        if let Some(rule) = self.first_match(&candidates, caller, target, Action::KillAndReap, true) {
            return Decision {
                kind: DecisionKind::DeniedByRule,
                allowed: false,
                rule: rule.name.clone(),
                reason: format!(
                    "denied by rule {:?}{}",
                    rule.name,
                    unverified_note(rule, caller, target)
                ),
            };
        }
        let creds = KillCreds {
            caller_euid: caller.uid,
            caller_ruid: caller.real_uid,
            target_ruid: target.ruid,
            target_suid: target.suid,
            caller_cap_kill: caller.cap_kill,
        };
        if self.kill_rule && kill_rule_allows(creds) {
            let why = if caller.uid == 0 && caller.cap_kill {
                "the caller is root".to_string()
            } else {
                let uid = caller
                    .kill_uids()
                    .find(|uid| *uid == target.ruid || *uid == target.suid)
                    .unwrap_or(caller.uid);
                format!(
                    "caller uid {uid} owns the target (real uid {}, saved uid {})",
                    target.ruid, target.suid
                )
            };
            return Decision {
                kind: DecisionKind::Allowed,
                allowed: true,
                rule: "kill(2)".into(),
                reason: format!("allowed by the kill(2) rule: {why}"),
            };
        }
        if let Some(rule) = self.first_match(&candidates, caller, target, Action::KillAndReap, false) {
            return Decision {
                kind: DecisionKind::Allowed,
                allowed: true,
                rule: rule.name.clone(),
                reason: format!("allowed by rule {:?}", rule.name),
            };
        }
        let caller_ids = match caller.real_uid {
            Some(ruid) if ruid != caller.uid => format!("euid {} / uid {ruid}", caller.uid),
            _ => format!("uid {}", caller.uid),
        };
        let kill_rule = if self.kill_rule && caller.uid == 0 {
            format!(
                "caller uid 0 does not hold CAP_KILL (kill(2) would refuse it too) and owns neither the target's \
                 real uid {} nor its saved uid {}",
                target.ruid, target.suid
            )
        } else if self.kill_rule {
            format!(
                "caller {caller_ids} is not root and owns neither the target's real uid {} nor its saved uid {}",
                target.ruid, target.suid
            )
        } else {
            format!("the kill(2) rule is off and no rule grants kill-and-reap to caller {caller_ids}")
        };
        let userns = if caller.userns_capabilities {
            "; the caller holds capabilities in a user namespace, which the broker does not honour \
             (kill(2) would for that namespace's processes: see docs/policy.md)"
        } else {
            ""
        };
        Decision {
            kind: DecisionKind::NoRule,
            allowed: false,
            rule: "no-matching-rule".into(),
            reason: format!("no rule allows it: {kill_rule}{userns}"),
        }
    }

    /// May the caller ask about this target at all? `None` if yes, else the
    /// refusal. Asking is allowed when `check = "anyone"`, or a rule grants
    /// `check` or `kill-and-reap` over the target, or the kill(2) rule
    /// would allow the kill, and no deny rule for `check` matches.
    pub fn check_refusal(&self, caller: &Caller, target: &TargetProcess) -> Option<Decision> {
        let candidates = self.index.candidates(caller);
        if let Some(rule) = self.first_match(&candidates, caller, target, Action::Check, true) {
            return Some(Decision {
                kind: DecisionKind::DeniedByRule,
                allowed: false,
                rule: rule.name.clone(),
                reason: format!(
                    "checking this process is denied by rule {:?}{}",
                    rule.name,
                    unverified_note(rule, caller, target)
                ),
            });
        }
        if self.check_anyone {
            return None;
        }
        let creds = KillCreds {
            caller_euid: caller.uid,
            caller_ruid: caller.real_uid,
            target_ruid: target.ruid,
            target_suid: target.suid,
            caller_cap_kill: caller.cap_kill,
        };
        if (self.kill_rule && kill_rule_allows(creds))
            || self
                .first_match(&candidates, caller, target, Action::Check, false)
                .is_some()
        {
            return None;
        }
        Some(Decision {
            kind: DecisionKind::NoRule,
            allowed: false,
            rule: "no-check-grant".into(),
            reason: format!("no rule grants caller uid {} `check` over this process", caller.uid),
        })
    }

    /// May `subscriber` see the event of a kill of `target`? `Some(why)`
    /// names the entitlement ("deny" rules win, as everywhere):
    /// - `root`: uid 0 holding CAP_KILL (it could read the audit log);
    /// - `owner`: the subscriber's effective or real uid is the target's
    ///   real or saved uid (the processes kill(2) would let it signal, i.e.
    ///   its own; whether or not the kill(2) rule is on);
    /// - an allow rule with the `watch` action matching the subscriber and
    ///   the target (its name).
    ///
    /// The target's facts are the ones the kill was decided on.
    pub fn watch_grant(&self, subscriber: &Caller, target: &TargetProcess) -> Option<String> {
        let candidates = self.index.candidates(subscriber);
        if self
            .first_match(&candidates, subscriber, target, Action::Watch, true)
            .is_some()
        {
            return None;
        }
        if subscriber.uid == 0 && subscriber.cap_kill {
            return Some("root".into());
        }
        let owner = KillCreds {
            caller_euid: subscriber.uid,
            caller_ruid: subscriber.real_uid,
            target_ruid: target.ruid,
            target_suid: target.suid,
            caller_cap_kill: false,
        };
        if kill_rule_allows(owner) {
            return Some("owner".into());
        }
        self.first_match(&candidates, subscriber, target, Action::Watch, false)
            .map(|rule| rule.name.clone())
    }

    /// May `caller` read the broker's metrics (aggregate counts of every
    /// caller's kills)? Root holding CAP_KILL, or a caller an allow rule with
    /// the `watch` action names (whatever its targets); `Some` names which.
    pub fn metrics_grant(&self, caller: &Caller) -> Option<String> {
        if caller.uid == 0 && caller.cap_kill {
            return Some("root".into());
        }
        self.index
            .candidates(caller)
            .iter()
            .map(|i| &self.rules[*i as usize])
            .find(|r| r.watch && !r.deny && r.caller.matches(caller, Mode::Allow))
            .map(|r| r.name.clone())
    }

    /// Targets nobody may kill through the broker.
    fn protection(&self, target: &TargetProcess, broker: BrokerFacts) -> Option<(String, String)> {
        // The caller's pid 1 too: kill(2) from inside a pid namespace never
        // delivers SIGKILL to its init (SIGNAL_UNKILLABLE), so the broker,
        // which sits above that namespace, must not either.
        if target.pid == 1 || target.caller_pid == 1 {
            return Some(("protect:init".into(), "pid 1 (init) is protected".into()));
        }
        if target.is_kernel_thread {
            return Some((
                "protect:kernel-thread".into(),
                format!("pid {} is a kernel thread", target.caller_pid),
            ));
        }
        if target.pid == broker.pid {
            return Some(("protect:broker".into(), "the broker does not kill itself".into()));
        }
        if self.protect_oom_min && target.oom_score_adj == -1000 {
            return Some((
                "protect:oom-score-adj".into(),
                format!("pid {} has oom_score_adj -1000 (never OOM-kill)", target.caller_pid),
            ));
        }
        self.protected.iter().find(|p| p.matches(target)).map(|p| {
            let label = p.label();
            let why = if p.needs_cgroup() && target.cgroup.is_none() {
                ": unverified fact: its cgroup could not be read, so the protection applies"
            } else {
                ""
            };
            (
                format!("protect:{label}"),
                format!("pid {} is protected by the policy ({label}){why}", target.caller_pid),
            )
        })
    }
}

/// Names the unverified fact a deny rule matched on, if any: deny rules
/// and protections apply when the fact they read cannot be verified.
fn unverified_note(rule: &Rule, caller: &Caller, target: &TargetProcess) -> String {
    let mut facts = Vec::new();
    if rule.caller.needs_cgroup() && caller.cgroup.is_none() {
        facts.push("the caller's cgroup (the caller may have exited)");
    }
    if rule.target.needs_cgroup() && target.cgroup.is_none() {
        facts.push("the target's cgroup");
    }
    if facts.is_empty() {
        String::new()
    } else {
        format!(
            ": unverified fact: {} could not be read, and a deny rule applies to what it cannot verify",
            facts.join(" and ")
        )
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// `kill_ok_by_cred()` in kernel/signal.c, worked by hand: the sender's
    /// euid or uid equals the target's suid or uid, or the sender holds
    /// CAP_KILL. Each case names the clause that decides it; none is
    /// computed, so a rule typed wrongly cannot agree with itself here.
    /// (The running kernel is the oracle in tests/tests/kill_oracle.rs.)
    #[test]
    fn kill_rule_on_hand_worked_kill_ok_by_cred_cases() {
        const U: u32 = 1000;
        const V: u32 = 1001;
        const W: u32 = 1002;
        /// (why, caller euid, caller ruid, target ruid, target suid, caller
        /// root with CAP_KILL, allowed)
        type Case = (&'static str, u32, Option<u32>, u32, u32, bool, bool);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("euid == uid: the caller's own process",               U, Some(U), U, U, false, true),
            ("no uid in common",                                    U, Some(U), V, V, false, false),
            ("euid == suid: the target was started by U, setuid V", U, Some(U), V, U, false, true),
            ("uid == uid: the caller runs setuid V, target is U's", V, Some(U), U, W, false, true),
            ("uid == suid",                                         V, Some(U), W, U, false, true),
            ("a setuid-root program the user ran: euid == uid",     U, Some(U), U, 0, false, true),
            ("root's process, caller U",                            U, Some(U), 0, 0, false, false),
            ("real uid unknown: only the euid counts",              U, None,    V, V, false, false),
            ("real uid unknown, euid == suid",                      U, None,    V, U, false, true),
            ("real uid 0 (euid dropped to U) on root's process",    U, Some(0), 0, 0, false, true),
            ("root with CAP_KILL: anything",                        0, Some(0), V, V, true,  true),
            ("root without CAP_KILL is an ordinary uid 0",          0, Some(0), V, V, false, false),
            ("root without CAP_KILL on root's process",             0, Some(0), 0, V, false, true),
            ("euid 0 and uid U without CAP_KILL: uid == suid",      0, Some(U), V, U, false, true),
        ];
        for (why, caller_euid, caller_ruid, target_ruid, target_suid, caller_cap_kill, allowed) in cases {
            let creds = KillCreds {
                caller_euid: *caller_euid,
                caller_ruid: *caller_ruid,
                target_ruid: *target_ruid,
                target_suid: *target_suid,
                caller_cap_kill: *caller_cap_kill,
            };
            assert_eq!(kill_rule_allows(creds), *allowed, "{why}: {creds:?}");
        }
    }
}
