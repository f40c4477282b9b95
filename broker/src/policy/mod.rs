//! May this caller kill this target?
//!
//! The decision is a pure function of the caller's kernel-given identity and
//! the pinned target's facts. Order of evaluation:
//! 1. **Protected** targets are refused for every caller, root included.
//! 2. The **kill(2) rule** (the default rule): allowed iff the caller's
//!    effective or real uid equals the target's real or saved uid, or the
//!    caller is root — exactly `kill_ok_by_cred()` in `kernel/signal.c`,
//!    with "root" standing for CAP_KILL.
//! 3. Nothing matched: refused, with the reason.
//!
//! Every decision names the rule or protection that decided it.

use serde::Serialize;

use crate::caller::Caller;
use crate::target::TargetProcess;

/// The verdict and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// Short name of what decided: a rule name, a protection, or
    /// "no-matching-rule".
    pub rule: String,
    /// One sentence a person can read.
    pub reason: String,
}

/// Facts about the broker itself that the policy needs.
#[derive(Debug, Clone, Copy)]
pub struct BrokerFacts {
    pub pid: i32,
}

/// The credentials `kill_ok_by_cred()` compares, for the pure rule below
/// (and its property tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillCreds {
    pub caller_euid: u32,
    pub caller_ruid: Option<u32>,
    pub target_ruid: u32,
    pub target_suid: u32,
}

/// The kernel's kill(2) permission rule for an unprivileged sender: allowed
/// iff the caller's euid or uid equals the target's uid or suid; root
/// (euid 0) may kill anything.
pub fn kill_rule_allows(creds: KillCreds) -> bool {
    let caller = std::iter::once(creds.caller_euid).chain(creds.caller_ruid);
    creds.caller_euid == 0
        || caller
            .into_iter()
            .any(|uid| uid == creds.target_ruid || uid == creds.target_suid)
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// The kill(2)-equivalent default rule is on.
    pub kill_rule: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { kill_rule: true }
    }
}

impl Policy {
    pub fn decide(&self, caller: &Caller, target: &TargetProcess, broker: BrokerFacts) -> Decision {
        if let Some(protection) = protection(target, broker) {
            return Decision {
                allowed: false,
                rule: protection.0.into(),
                reason: protection.1,
            };
        }
        let creds = KillCreds {
            caller_euid: caller.uid,
            caller_ruid: caller.real_uid,
            target_ruid: target.ruid,
            target_suid: target.suid,
        };
        if self.kill_rule && kill_rule_allows(creds) {
            let why = if caller.uid == 0 {
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
                allowed: true,
                rule: "kill(2)".into(),
                reason: format!("allowed by the kill(2) rule: {why}"),
            };
        }
        let caller_ids = match caller.real_uid {
            Some(ruid) if ruid != caller.uid => format!("euid {} / uid {ruid}", caller.uid),
            _ => format!("uid {}", caller.uid),
        };
        Decision {
            allowed: false,
            rule: "no-matching-rule".into(),
            reason: format!(
                "no rule allows it: caller {caller_ids} is not root and owns neither the target's real uid {} nor its saved uid {}",
                target.ruid, target.suid
            ),
        }
    }
}

/// Targets nobody may kill through the broker.
fn protection(target: &TargetProcess, broker: BrokerFacts) -> Option<(&'static str, String)> {
    if target.pid == 1 {
        return Some(("protect:init", "pid 1 (init) is protected".into()));
    }
    if target.is_kernel_thread {
        return Some((
            "protect:kernel-thread",
            format!("pid {} is a kernel thread", target.pid),
        ));
    }
    if target.pid == broker.pid {
        return Some(("protect:broker", "the broker does not kill itself".into()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The pure rule is exactly kill_ok_by_cred() written out.
        #[test]
        fn kill_rule_matches_kernel_formula(e in 0u32..4, r in proptest::option::of(0u32..4), tr in 0u32..4, ts in 0u32..4) {
            let creds = KillCreds { caller_euid: e, caller_ruid: r, target_ruid: tr, target_suid: ts };
            let kernel = e == 0 || e == ts || e == tr || r == Some(ts) || r == Some(tr);
            prop_assert_eq!(kill_rule_allows(creds), kernel);
        }
    }
}
