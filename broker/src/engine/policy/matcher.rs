// SPDX-License-Identifier: MIT OR Apache-2.0
//! Compiled matchers: what a rule's `caller` and `target` tables become once
//! validated. Names are resolved to ids and globs are compiled, so matching
//! is pure and never touches NSS or the file system.

use globset::GlobMatcher;

use crate::engine::caller::Caller;
use crate::engine::target::TargetProcess;

/// An inclusive range of uids or gids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdSpan {
    pub lo: u32,
    pub hi: u32,
}

impl IdSpan {
    pub fn contains(&self, id: u32) -> bool {
        self.lo <= id && id <= self.hi
    }
}

fn any_span(spans: &[IdSpan], id: u32) -> bool {
    spans.iter().any(|s| s.contains(id))
}

/// A compiled glob, with its source text for explanations.
#[derive(Debug, Clone)]
pub struct Glob {
    pub text: String,
    pub matcher: GlobMatcher,
}

impl Glob {
    pub fn is_match(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

/// Unit suffixes systemd gives cgroups it creates.
const UNIT_SUFFIXES: [&str; 6] = [".service", ".scope", ".slice", ".socket", ".mount", ".swap"];

/// The systemd unit a cgroup path belongs to: its deepest path component
/// that names a unit (`/user.slice/user-1000.slice/session-2.scope/x` →
/// `session-2.scope`). `None` if no component names a unit.
pub fn unit_of_cgroup(path: &str) -> Option<&str> {
    path.rsplit('/')
        .find(|c| UNIT_SUFFIXES.iter().any(|s| c.len() > s.len() && c.ends_with(s)))
}

/// `path` is `subtree` or below it. Both are normalized absolute paths.
pub fn in_subtree(path: &str, subtree: &str) -> bool {
    if subtree == "/" {
        return path.starts_with('/');
    }
    path == subtree || (path.starts_with(subtree) && path.as_bytes().get(subtree.len()) == Some(&b'/'))
}

/// How to treat a fact the broker could not verify (an unknown cgroup) and
/// processes whose uids differ (setuid programs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Granting: unknown facts do not match, and every one of the target's
    /// real, effective and saved uids must match a uid matcher.
    Allow,
    /// Refusing: unknown facts match, and any one uid matching is enough.
    Deny,
}

#[derive(Debug, Clone, Default)]
pub struct CallerMatch {
    /// Matches every caller (`any = true`).
    pub any: bool,
    pub uids: Vec<IdSpan>,
    pub gids: Vec<IdSpan>,
    pub cgroups: Vec<String>,
    pub units: Vec<Glob>,
}

impl CallerMatch {
    /// The matcher reads the caller's cgroup.
    pub fn needs_cgroup(&self) -> bool {
        !self.any && (!self.cgroups.is_empty() || !self.units.is_empty())
    }

    /// Every given field matches (fields AND, list entries OR). The caller's
    /// uid is its effective uid from SO_PEERCRED; its groups are the primary
    /// gid and SO_PEERGROUPS.
    ///
    /// Its cgroup (see `crate::os::cgroup`): a grant (`Mode::Allow`) looks at
    /// the trusted prefix only, and never matches an unverified cgroup; a
    /// deny rule (`Mode::Deny`) looks at the full path, any unit named on
    /// it, and matches an unverified cgroup. Either way a caller cannot
    /// escape a deny rule or claim a grant by naming or leaving cgroups.
    pub fn matches(&self, caller: &Caller, mode: Mode) -> bool {
        if self.any {
            return true;
        }
        if !self.uids.is_empty() && !any_span(&self.uids, caller.uid) {
            return false;
        }
        if !self.gids.is_empty() && !caller.all_groups().any(|g| any_span(&self.gids, g)) {
            return false;
        }
        if !self.needs_cgroup() {
            return true;
        }
        let Some(cg) = caller.cgroup.as_ref() else {
            return mode == Mode::Deny;
        };
        match mode {
            Mode::Allow => {
                let path = cg.trusted.as_str();
                (self.cgroups.is_empty() || self.cgroups.iter().any(|p| in_subtree(path, p)))
                    && (self.units.is_empty()
                        || unit_of_cgroup(path).is_some_and(|u| self.units.iter().any(|g| g.is_match(u))))
            }
            Mode::Deny => {
                let path = cg.path.as_str();
                (self.cgroups.is_empty() || self.cgroups.iter().any(|p| in_subtree(path, p)))
                    && (self.units.is_empty() || units_on_path(path).any(|u| self.units.iter().any(|g| g.is_match(u))))
            }
        }
    }
}

/// Every component of a cgroup path that names a unit, deepest first.
pub fn units_on_path(path: &str) -> impl Iterator<Item = &str> {
    path.rsplit('/')
        .filter(|c| UNIT_SUFFIXES.iter().any(|s| c.len() > s.len() && c.ends_with(s)))
}

#[derive(Debug, Clone, Default)]
pub struct TargetMatch {
    pub any: bool,
    pub uids: Vec<IdSpan>,
    pub cgroups: Vec<String>,
    pub units: Vec<Glob>,
    /// Only in allow rules (the compiler refuses them in deny rules): a
    /// process names itself, so a comm can only narrow a grant.
    pub comms: Vec<Glob>,
    pub oom_score_adj: Option<(i32, i32)>,
}

impl TargetMatch {
    /// The matcher reads the target's cgroup.
    pub fn needs_cgroup(&self) -> bool {
        !self.any && (!self.cgroups.is_empty() || !self.units.is_empty())
    }

    /// Cgroup and unit matchers read the trusted prefix of the target's
    /// cgroup (a user cannot make its processes match by naming cgroups);
    /// an unverified cgroup matches in `Mode::Deny` only.
    pub fn matches(&self, target: &TargetProcess, mode: Mode) -> bool {
        if self.any {
            return true;
        }
        if !self.uids.is_empty() {
            let ids = [target.ruid, target.euid, target.suid];
            let ok = match mode {
                Mode::Allow => ids.iter().all(|id| any_span(&self.uids, *id)),
                Mode::Deny => ids.iter().any(|id| any_span(&self.uids, *id)),
            };
            if !ok {
                return false;
            }
        }
        if self.needs_cgroup() {
            let ok = match target.cgroup.as_ref() {
                None => mode == Mode::Deny,
                Some(cg) => {
                    let path = cg.trusted.as_str();
                    (self.cgroups.is_empty() || self.cgroups.iter().any(|p| in_subtree(path, p)))
                        && (self.units.is_empty()
                            || unit_of_cgroup(path).is_some_and(|u| self.units.iter().any(|g| g.is_match(u))))
                }
            };
            if !ok {
                return false;
            }
        }
        if !self.comms.is_empty() && !self.comms.iter().any(|g| g.is_match(&target.comm)) {
            return false;
        }
        if let Some((lo, hi)) = self.oom_score_adj {
            if !(lo..=hi).contains(&target.oom_score_adj) {
                return false;
            }
        }
        true
    }
}

/// One thing the `protect` section names. Each entry protects on its own.
/// Only facts a process cannot choose for itself protect: uids, and cgroups
/// or units read from the trusted prefix (comms and exes are refused by the
/// compiler, see `docs/policy.md`).
#[derive(Debug, Clone)]
pub enum Protected {
    Uids(IdSpan),
    Cgroup(String),
    Unit(Glob),
}

impl Protected {
    /// Protections refuse, so an unverified cgroup counts as protected.
    pub fn matches(&self, target: &TargetProcess) -> bool {
        match self {
            Protected::Uids(span) => [target.ruid, target.euid, target.suid]
                .iter()
                .any(|id| span.contains(*id)),
            Protected::Cgroup(p) => target.cgroup.as_ref().is_none_or(|cg| in_subtree(&cg.trusted, p)),
            Protected::Unit(g) => target
                .cgroup
                .as_ref()
                .is_none_or(|cg| unit_of_cgroup(&cg.trusted).is_some_and(|u| g.is_match(u))),
        }
    }

    /// The protection reads the target's cgroup.
    pub fn needs_cgroup(&self) -> bool {
        !matches!(self, Protected::Uids(_))
    }

    pub fn label(&self) -> String {
        match self {
            Protected::Uids(s) if s.lo == s.hi => format!("uid {}", s.lo),
            Protected::Uids(s) => format!("uids {}-{}", s.lo, s.hi),
            Protected::Cgroup(p) => format!("cgroup {p}"),
            Protected::Unit(g) => format!("unit {}", g.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_cgroups() {
        assert_eq!(
            unit_of_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.scope"),
            Some("foo.scope")
        );
        assert_eq!(unit_of_cgroup("/system.slice/sshd.service"), Some("sshd.service"));
        assert_eq!(unit_of_cgroup("/system.slice/sshd.service/extra"), Some("sshd.service"));
        assert_eq!(unit_of_cgroup("/"), None);
        assert_eq!(unit_of_cgroup("/.service"), None);
    }

    #[test]
    fn subtrees() {
        assert!(in_subtree("/a/b", "/a"));
        assert!(in_subtree("/a", "/a"));
        assert!(!in_subtree("/ab", "/a"));
        assert!(in_subtree("/x", "/"));
    }
}
