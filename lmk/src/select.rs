//! Whom to kill: the broker's candidates (only what this caller may kill),
//! narrowed to the scope, minus `ignore`, `prefer` first and `avoid` last,
//! in the broker's ranking within each tier.

use reapd_client::manager::{Candidate, CgroupCandidate};
use serde::Serialize;

use crate::config::Config;

/// Where a victim stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Preferred,
    Normal,
    Avoided,
}

/// `cgroup` is `scope` or below it (`None`: everything is in scope).
pub fn in_scope(cgroup: &str, scope: Option<&str>) -> bool {
    match scope {
        None | Some("/") => true,
        Some(s) => cgroup == s || cgroup.strip_prefix(s).is_some_and(|rest| rest.starts_with('/')),
    }
}

fn tier(config: &Config, comm: &str, cgroup: &str) -> Option<Tier> {
    if config.ignore.matches(comm, cgroup) {
        None
    } else if config.prefer.matches(comm, cgroup) {
        Some(Tier::Preferred)
    } else if config.avoid.matches(comm, cgroup) {
        Some(Tier::Avoided)
    } else {
        Some(Tier::Normal)
    }
}

/// The processes to try, in order. `candidates` comes ranked by the broker.
pub fn processes<'a>(config: &Config, candidates: &'a [Candidate]) -> Vec<(Tier, &'a Candidate)> {
    let mut out: Vec<(Tier, &Candidate)> = candidates
        .iter()
        .filter_map(|c| {
            let p = &c.process;
            if !in_scope(&p.cgroup, config.scope.as_deref()) {
                return None;
            }
            Some((tier(config, &p.comm, &p.cgroup)?, c))
        })
        .collect();
    // Stable: the broker's ranking stays within a tier.
    out.sort_by_key(|(t, _)| *t);
    out
}

/// The cgroups to try, in order: strictly below the scope (never the scope
/// itself), every member killable (the broker lists only those). A group
/// takes the tier of its path and members: any ignored member excludes it,
/// any preferred member prefers it, any avoided member avoids it.
pub fn cgroups<'a>(
    config: &Config,
    groups: &'a [CgroupCandidate],
    members: &[Candidate],
) -> Vec<(Tier, &'a CgroupCandidate)> {
    let mut out: Vec<(Tier, &CgroupCandidate)> = groups
        .iter()
        .filter(|g| g.cgroup != "/" && in_scope(&g.cgroup, config.scope.as_deref()))
        .filter(|g| config.scope.as_deref() != Some(g.cgroup.as_str()))
        .filter_map(|g| {
            let mut tiers = vec![tier(config, "", &g.cgroup)];
            tiers.extend(
                members
                    .iter()
                    .map(|m| &m.process)
                    .filter(|p| p.cgroup == g.cgroup)
                    .map(|p| tier(config, &p.comm, &p.cgroup)),
            );
            if tiers.contains(&None) {
                return None;
            }
            let tiers: Vec<Tier> = tiers.into_iter().flatten().collect();
            let t = if tiers.contains(&Tier::Preferred) {
                Tier::Preferred
            } else if tiers.contains(&Tier::Avoided) {
                Tier::Avoided
            } else {
                Tier::Normal
            };
            Some((t, g))
        })
        .collect();
    out.sort_by_key(|(t, _)| *t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reapd_client::{MemoryUsage, ProcessInfo};

    fn candidate(pid: i32, comm: &str, cgroup: &str) -> Candidate {
        Candidate {
            process: ProcessInfo {
                pid,
                uid: 1000,
                euid: 1000,
                suid: 1000,
                gid: 1000,
                comm: comm.into(),
                start_time: 1,
                cgroup: cgroup.into(),
            },
            memory: MemoryUsage::default(),
            unique_bytes: 0,
            oom_score: 0,
            oom_score_adj: 0,
            rule: "kill(2)".into(),
        }
    }

    #[test]
    fn scope_is_a_subtree_not_a_prefix() {
        assert!(in_scope("/a/b", Some("/a")));
        assert!(in_scope("/a", Some("/a")));
        assert!(!in_scope("/ab", Some("/a")));
        assert!(in_scope("/x", None));
    }

    #[test]
    fn prefer_first_avoid_last_ignore_never_ranking_kept() {
        let config = crate::config::parse(
            "[scope]\ncgroup = \"/s\"\n[kill]\nprefer = { comm = [\"^leak\"] }\navoid = { cgroup = [\"db\"] }\nignore = { comm = [\"^sshd$\"] }\n",
        )
        .unwrap();
        let list = vec![
            candidate(1, "db", "/s/db"),
            candidate(2, "sshd", "/s/a"),
            candidate(3, "big", "/s/a"),
            candidate(4, "outside", "/t"),
            candidate(5, "small", "/s/b"),
            candidate(6, "leaker", "/s/b"),
        ];
        let order: Vec<i32> = processes(&config, &list).iter().map(|(_, c)| c.process.pid).collect();
        assert_eq!(order, vec![6, 3, 5, 1]);
    }

    #[test]
    fn cgroups_below_the_scope_without_ignored_members() {
        let config = crate::config::parse(
            "[scope]\ncgroup = \"/s\"\n[kill]\nmode = \"cgroup\"\nignore = { comm = [\"^sshd$\"] }\n",
        )
        .unwrap();
        let group = |path: &str| CgroupCandidate {
            cgroup: path.into(),
            processes: 1,
            memory: MemoryUsage::default(),
        };
        let groups = vec![group("/s"), group("/s/a"), group("/s/b"), group("/t")];
        let members = vec![candidate(2, "sshd", "/s/a"), candidate(3, "x", "/s/b")];
        let chosen: Vec<&str> = cgroups(&config, &groups, &members)
            .iter()
            .map(|(_, g)| g.cgroup.as_str())
            .collect();
        assert_eq!(chosen, vec!["/s/b"]);
    }
}
