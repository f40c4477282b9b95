//! Compiled matchers: what a rule's `caller` and `target` tables become once
//! validated. Names are resolved to ids and globs are compiled, so matching
//! is pure and never touches NSS or the file system.

use globset::GlobMatcher;

use crate::caller::Caller;
use crate::target::TargetProcess;

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

/// How to treat a fact the broker could not learn (an unreadable exe, an
/// unknown cgroup) and processes whose uids differ (setuid programs).
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
    /// Every given field matches (fields AND, list entries OR). The caller's
    /// uid is its effective uid from SO_PEERCRED; its groups are the primary
    /// gid and SO_PEERGROUPS. An unverified cgroup (`None`) matches nothing.
    pub fn matches(&self, caller: &Caller) -> bool {
        if self.any {
            return true;
        }
        if !self.uids.is_empty() && !any_span(&self.uids, caller.uid) {
            return false;
        }
        if !self.gids.is_empty() && !caller.all_groups().any(|g| any_span(&self.gids, g)) {
            return false;
        }
        if !self.cgroups.is_empty() {
            let Some(cg) = caller.cgroup.as_deref() else {
                return false;
            };
            if !self.cgroups.iter().any(|p| in_subtree(cg, p)) {
                return false;
            }
        }
        if !self.units.is_empty() {
            let Some(unit) = caller.cgroup.as_deref().and_then(unit_of_cgroup) else {
                return false;
            };
            if !self.units.iter().any(|g| g.is_match(unit)) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Clone, Default)]
pub struct TargetMatch {
    pub any: bool,
    pub uids: Vec<IdSpan>,
    pub cgroups: Vec<String>,
    pub units: Vec<Glob>,
    pub exes: Vec<Glob>,
    pub comms: Vec<Glob>,
    pub oom_score_adj: Option<(i32, i32)>,
}

impl TargetMatch {
    pub fn matches(&self, target: &TargetProcess, mode: Mode) -> bool {
        if self.any {
            return true;
        }
        let unknown = mode == Mode::Deny;
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
        if !self.cgroups.is_empty() {
            let ok = if target.cgroup.is_empty() {
                unknown
            } else {
                self.cgroups.iter().any(|p| in_subtree(&target.cgroup, p))
            };
            if !ok {
                return false;
            }
        }
        if !self.units.is_empty() {
            let ok = if target.cgroup.is_empty() {
                unknown
            } else {
                unit_of_cgroup(&target.cgroup).is_some_and(|u| self.units.iter().any(|g| g.is_match(u)))
            };
            if !ok {
                return false;
            }
        }
        if !self.exes.is_empty() {
            let ok = match &target.exe {
                Some(exe) => self.exes.iter().any(|g| g.matcher.is_match(exe)),
                None => unknown,
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
#[derive(Debug, Clone)]
pub enum Protected {
    Uids(IdSpan),
    Cgroup(String),
    Unit(Glob),
    Exe(Glob),
    Comm(Glob),
}

impl Protected {
    /// Protections refuse, so unknown facts count as protected.
    pub fn matches(&self, target: &TargetProcess) -> bool {
        match self {
            Protected::Uids(span) => [target.ruid, target.euid, target.suid]
                .iter()
                .any(|id| span.contains(*id)),
            Protected::Cgroup(p) => target.cgroup.is_empty() || in_subtree(&target.cgroup, p),
            Protected::Unit(g) => {
                target.cgroup.is_empty() || unit_of_cgroup(&target.cgroup).is_some_and(|u| g.is_match(u))
            }
            Protected::Exe(g) => target.exe.as_ref().is_none_or(|e| g.matcher.is_match(e)),
            Protected::Comm(g) => g.is_match(&target.comm),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Protected::Uids(s) if s.lo == s.hi => format!("uid {}", s.lo),
            Protected::Uids(s) => format!("uids {}-{}", s.lo, s.hi),
            Protected::Cgroup(p) => format!("cgroup {p}"),
            Protected::Unit(g) => format!("unit {}", g.text),
            Protected::Exe(g) => format!("exe {}", g.text),
            Protected::Comm(g) => format!("comm {}", g.text),
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
