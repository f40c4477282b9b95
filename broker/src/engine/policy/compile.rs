// SPDX-License-Identifier: MIT OR Apache-2.0
//! From a policy file's text to a compiled [`Policy`]: parse, validate
//! every field (reporting `file:line:col` for each problem), resolve user
//! and group names through NSS, compile globs, and build the indexes.
//!
//! Validation is complete before anything is built, so a caller either gets
//! a whole policy or a list of errors, never something in between.

use std::collections::HashSet;
use std::time::Duration;

use crate::engine::reaper::MAX_REAP_DELAY;
use std::ops::Range;

use globset::GlobBuilder;
use toml::Spanned;

use super::file::{IdRange, RawCaller, RawPolicy, RawProtect, RawRule, RawTarget};
use super::matcher::{CallerMatch, Glob, IdSpan, Protected, TargetMatch};
use super::{Policy, Rule};
use crate::engine::limits::KillLimits;

/// One problem in a policy file, at a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// One or more problems; each prints as `file:line:col: message`.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<PolicyError>),
}

/// How names are resolved. The real one asks NSS; tests and the fuzzer use
/// a fixed table so they neither depend on nor hammer the system's NSS.
pub trait Resolver {
    fn user(&self, name: &str) -> Option<u32>;
    fn group(&self, name: &str) -> Option<u32>;
}

/// Resolves through NSS (getpwnam_r / getgrnam_r via `nix`).
pub struct Nss;

impl Resolver for Nss {
    fn user(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
    fn group(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Largest policy file accepted: bounds parse time and memory.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// Reads, validates and compiles the file at `path`.
pub fn load_file(path: &std::path::Path) -> Result<(Policy, KillLimits), LoadError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        file: file.clone(),
        source,
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let offset = err.utf8_error().valid_up_to();
            let text = String::from_utf8_lossy(err.as_bytes()).into_owned();
            let mut c = Checker::new(&file, &text);
            c.err(offset..offset, "the policy file is not valid UTF-8");
            return Err(LoadError::Invalid(c.errors));
        }
    };
    compile(&file, &text, &Nss).map_err(LoadError::Invalid)
}

/// Validates and compiles policy text. `file` is only used in messages.
pub fn compile(file: &str, text: &str, resolver: &dyn Resolver) -> Result<(Policy, KillLimits), Vec<PolicyError>> {
    let mut c = Checker::new(file, text);
    if text.len() > MAX_FILE_BYTES {
        c.err(0..0, format!("the policy file is larger than {MAX_FILE_BYTES} bytes"));
        return Err(c.errors);
    }
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            let span = err.span().unwrap_or(0..0);
            c.err(span, err.message().trim().to_string());
            return Err(c.errors);
        }
    };

    let mut policy = Policy::default();
    if let Some(defaults) = &raw.defaults {
        let d = defaults.get_ref();
        if let Some(kill_rule) = d.kill_rule {
            policy.kill_rule = kill_rule;
        }
        if let Some(check) = &d.check {
            match check.get_ref().as_str() {
                "anyone" => policy.check_anyone = true,
                "granted" => policy.check_anyone = false,
                other => c.err(
                    check.span(),
                    format!("unknown check mode {other:?}: expected \"anyone\" or \"granted\""),
                ),
            }
        }
        if let Some(delay) = &d.reap_delay_ms {
            match u32::try_from(*delay.get_ref()) {
                Ok(ms) if u64::from(ms) <= MAX_REAP_DELAY.as_millis() as u64 => {
                    policy.reap_delay = Duration::from_millis(ms.into());
                }
                _ => c.err(
                    delay.span(),
                    format!("`reap-delay-ms` must be between 0 and {}", MAX_REAP_DELAY.as_millis()),
                ),
            }
        }
    }
    if let Some(protect) = &raw.protect {
        c.protect(protect, &mut policy, resolver);
    }
    let limits = c.limits(&raw);

    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    for rule in &raw.rule {
        if let Some(rule) = c.rule(rule, &mut names, resolver) {
            rules.push(rule);
        }
    }
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    policy.set_rules(rules);
    Ok((policy, limits))
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl<'a> Checker<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        Checker {
            file,
            text,
            errors: Vec::new(),
        }
    }

    /// Line and column (1-based, in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.errors.push(PolicyError {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        });
    }

    /// A list that is present must not be empty: an empty list would match
    /// nothing, which is never what the writer meant.
    fn nonempty<T>(&mut self, list: &Spanned<Vec<T>>, what: &str) -> bool {
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                format!("empty list `{what}` matches nothing; remove it or name something"),
            );
            return false;
        }
        true
    }

    fn id_range(&mut self, id: &Spanned<IdRange>, what: &str) -> Option<IdSpan> {
        let parse = |s: &str| -> Option<u32> {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
        };
        let span = match id.get_ref() {
            IdRange::Int(n) => match u32::try_from(*n) {
                Ok(n) if n != u32::MAX => IdSpan { lo: n, hi: n },
                _ => {
                    self.err(id.span(), format!("{what} {n} is out of range (0 to 4294967294)"));
                    return None;
                }
            },
            IdRange::Text(text) => {
                let (lo, hi) = match text.split_once('-') {
                    Some((lo, hi)) => (parse(lo), parse(hi)),
                    None => (parse(text), parse(text)),
                };
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo <= hi && hi != u32::MAX => IdSpan { lo, hi },
                    (Some(lo), Some(hi)) if lo > hi => {
                        self.err(
                            id.span(),
                            format!("bad {what} range {text:?}: start {lo} is above end {hi}"),
                        );
                        return None;
                    }
                    _ => {
                        self.err(
                            id.span(),
                            format!("bad {what} range {text:?}: expected N or N-M with ids 0 to 4294967294"),
                        );
                        return None;
                    }
                }
            }
        };
        Some(span)
    }

    fn ids(&mut self, list: &Option<Spanned<Vec<Spanned<IdRange>>>>, what: &str, out: &mut Vec<IdSpan>) {
        if let Some(list) = list {
            if self.nonempty(list, &format!("{what}s")) {
                for id in list.get_ref() {
                    if let Some(span) = self.id_range(id, what) {
                        out.push(span);
                    }
                }
            }
        }
    }

    fn names(
        &mut self,
        list: &Option<Spanned<Vec<Spanned<String>>>>,
        group: bool,
        resolver: &dyn Resolver,
        out: &mut Vec<IdSpan>,
    ) {
        let Some(list) = list else { return };
        let what = if group { "groups" } else { "users" };
        if !self.nonempty(list, what) {
            return;
        }
        for name in list.get_ref() {
            let n = name.get_ref();
            let id = if group { resolver.group(n) } else { resolver.user(n) };
            match id {
                Some(id) => out.push(IdSpan { lo: id, hi: id }),
                None => self.err(
                    name.span(),
                    format!(
                        "unknown {} {n:?} (not found through NSS)",
                        if group { "group" } else { "user" }
                    ),
                ),
            }
        }
    }

    fn cgroups(&mut self, list: &Option<Spanned<Vec<Spanned<String>>>>, out: &mut Vec<String>) {
        let Some(list) = list else { return };
        if !self.nonempty(list, "cgroups") {
            return;
        }
        for path in list.get_ref() {
            let raw = path.get_ref();
            let trimmed = raw.trim_matches('/');
            let bad = raw.contains('\0')
                || raw.contains("//")
                || trimmed.split('/').any(|c| c == "." || c == "..")
                || (trimmed.is_empty() && raw != "/")
                || raw.len() > 4096;
            if bad {
                self.err(
                    path.span(),
                    format!("bad cgroup path {raw:?}: expected a path like \"system.slice/sshd.service\""),
                );
                continue;
            }
            out.push(format!("/{trimmed}"));
        }
    }

    fn globs(&mut self, list: &Option<Spanned<Vec<Spanned<String>>>>, what: &str, path: bool, out: &mut Vec<Glob>) {
        let Some(list) = list else { return };
        if !self.nonempty(list, what) {
            return;
        }
        for pattern in list.get_ref() {
            let text = pattern.get_ref();
            if text.is_empty() {
                self.err(pattern.span(), format!("empty pattern in `{what}`"));
                continue;
            }
            if path && !text.starts_with('/') {
                self.err(
                    pattern.span(),
                    format!("bad executable pattern {text:?}: must be an absolute path"),
                );
                continue;
            }
            match GlobBuilder::new(text).literal_separator(path).build() {
                Ok(glob) => out.push(Glob {
                    text: text.clone(),
                    matcher: glob.compile_matcher(),
                }),
                Err(err) => self.err(pattern.span(), format!("bad glob {text:?}: {}", err.kind())),
            }
        }
    }

    fn protect(&mut self, protect: &Spanned<RawProtect>, policy: &mut Policy, resolver: &dyn Resolver) {
        let p = protect.get_ref();
        if let Some(on) = p.oom_score_adj_min {
            policy.protect_oom_min = on;
        }
        let mut uids = Vec::new();
        self.ids(&p.uids, "uid", &mut uids);
        self.names(&p.users, false, resolver, &mut uids);
        let mut cgroups = Vec::new();
        self.cgroups(&p.cgroups, &mut cgroups);
        let mut units = Vec::new();
        self.globs(&p.units, "units", false, &mut units);
        self.refuse_exes(&p.exes);
        if let Some(comms) = &p.comms {
            self.err(
                comms.span(),
                "`protect.comms` is refused: a process chooses its own comm (prctl(PR_SET_NAME)), so any user's \
                 process could claim this protection and hide from a delegated OOM killer; protect by uid, cgroup \
                 or unit instead (see docs/policy.md)",
            );
        }
        let list = &mut policy.protected;
        list.extend(uids.into_iter().map(Protected::Uids));
        list.extend(cgroups.into_iter().map(Protected::Cgroup));
        list.extend(units.into_iter().map(Protected::Unit));
        // Sorted so the reason given never depends on the file's order.
        list.sort_by_key(|p| p.label());
    }

    /// Exe matchers are refused wherever they appear: the broker holds only
    /// CAP_KILL, and reading `/proc/PID/exe` of another user's process
    /// needs ptrace access, so the fact is unknowable for exactly the
    /// processes a policy is about; a matcher that can never be decided
    /// would either protect everything or grant nothing, with a false reason.
    fn refuse_exes(&mut self, exes: &Option<Spanned<Vec<Spanned<String>>>>) {
        if let Some(exes) = exes {
            self.err(
                exes.span(),
                "`exes` matchers are refused: with only CAP_KILL the broker cannot read /proc/PID/exe of other \
                 users' processes (the kernel wants ptrace access), so an exe could never be verified; match by \
                 uid, cgroup or unit instead (see docs/policy.md)",
            );
        }
    }

    fn limits(&mut self, raw: &RawPolicy) -> KillLimits {
        let mut limits = KillLimits::default();
        let Some(l) = &raw.limits else { return limits };
        let l = l.get_ref();
        let positive = |v: &Option<Spanned<i64>>, what: &str, checker: &mut Self| -> Option<u32> {
            let v = v.as_ref()?;
            match u32::try_from(*v.get_ref()) {
                Ok(n) if (1..=1_000_000).contains(&n) => Some(n),
                _ => {
                    checker.err(v.span(), format!("`{what}` must be between 1 and 1000000"));
                    None
                }
            }
        };
        let kills = positive(&l.kills, "kills", self);
        let burst = positive(&l.burst, "burst", self);
        let in_flight = positive(&l.max_in_flight, "max-in-flight", self);
        let interval = match &l.interval_secs {
            Some(v) => {
                let secs = *v.get_ref();
                if secs.is_finite() && (0.001..=86_400.0).contains(&secs) {
                    Some(secs)
                } else {
                    self.err(v.span(), "`interval-secs` must be between 0.001 and 86400");
                    None
                }
            }
            None => None,
        };
        if interval.is_some() && kills.is_none() && l.kills.is_none() {
            if let Some(v) = &l.interval_secs {
                self.err(v.span(), "`interval-secs` without `kills` says nothing; give both");
            }
        }
        if let Some(kills) = kills {
            limits.kills_per_second = kills as f64 / interval.unwrap_or(1.0);
        }
        if let Some(burst) = burst {
            limits.burst = burst;
        }
        if let Some(n) = in_flight {
            limits.max_in_flight = n;
        }
        limits
    }

    fn rule(&mut self, rule: &Spanned<RawRule>, names: &mut HashSet<String>, resolver: &dyn Resolver) -> Option<Rule> {
        let errors_before = self.errors.len();
        let r = rule.get_ref();
        let name = r.name.get_ref().clone();
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.:@".contains(ch))
        {
            self.err(
                r.name.span(),
                format!("bad rule name {name:?}: use 1 to 128 letters, digits and - _ . : @"),
            );
        } else if !names.insert(name.clone()) {
            self.err(
                r.name.span(),
                format!("rule name {name:?} is used twice; names must be unique"),
            );
        }
        let deny = match r.effect.as_ref().map(|e| (e.get_ref().as_str(), e.span())) {
            None | Some(("allow", _)) => false,
            Some(("deny", _)) => true,
            Some((other, span)) => {
                self.err(
                    span,
                    format!("unknown effect {other:?}: expected \"allow\" or \"deny\""),
                );
                false
            }
        };
        let (mut kill, mut check, mut watch) = (false, false, false);
        if self.nonempty(&r.actions, "actions") {
            for action in r.actions.get_ref() {
                match action.get_ref().as_str() {
                    "kill-and-reap" => kill = true,
                    "check" => check = true,
                    "watch" => watch = true,
                    other => self.err(
                        action.span(),
                        format!("unknown action {other:?}: expected \"kill-and-reap\", \"check\" or \"watch\""),
                    ),
                }
            }
        }
        let caller = match &r.caller {
            Some(caller) => self.caller(caller, resolver),
            None => {
                self.err(
                    rule.span(),
                    format!("rule {name:?} has no `caller` table; say whom it applies to (`caller.any = true` for everyone)"),
                );
                CallerMatch::default()
            }
        };
        let target = match &r.target {
            Some(target) => {
                if let (true, Some(comms)) = (deny, &target.get_ref().comms) {
                    self.err(
                        comms.span(),
                        "`target.comms` in a deny rule is refused: a process chooses its own comm, so any user could \
                         make its processes match and escape a delegated OOM killer; deny by uid, cgroup or unit",
                    );
                }
                self.target(target, resolver)
            }
            None => {
                self.err(
                    rule.span(),
                    format!("rule {name:?} has no `target` table; say what it applies to (`target.any = true` for everything)"),
                );
                TargetMatch::default()
            }
        };
        (self.errors.len() == errors_before).then_some(Rule {
            name,
            deny,
            kill,
            check,
            watch,
            caller,
            target,
        })
    }

    /// `any = true` must stand alone; a table with nothing in it is refused.
    fn any_flag(&mut self, any: &Option<Spanned<bool>>, others: bool, table: Range<usize>, which: &str) -> bool {
        match any {
            Some(a) if *a.get_ref() && others => {
                self.err(
                    a.span(),
                    format!("`{which}.any = true` contradicts the other `{which}` matchers; use one or the other"),
                );
                true
            }
            Some(a) if *a.get_ref() => true,
            Some(a) if !others => {
                self.err(
                    a.span(),
                    format!("`{which}.any = false` with no other matcher matches nothing"),
                );
                false
            }
            None if !others => {
                self.err(
                    table,
                    format!("empty `{which}` matcher; name something, or `{which}.any = true` for everything"),
                );
                false
            }
            _ => false,
        }
    }

    fn caller(&mut self, caller: &Spanned<RawCaller>, resolver: &dyn Resolver) -> CallerMatch {
        let c = caller.get_ref();
        let others = c.uids.is_some()
            || c.users.is_some()
            || c.gids.is_some()
            || c.groups.is_some()
            || c.cgroups.is_some()
            || c.units.is_some();
        let mut m = CallerMatch {
            any: self.any_flag(&c.any, others, caller.span(), "caller"),
            ..CallerMatch::default()
        };
        self.ids(&c.uids, "uid", &mut m.uids);
        self.names(&c.users, false, resolver, &mut m.uids);
        self.ids(&c.gids, "gid", &mut m.gids);
        self.names(&c.groups, true, resolver, &mut m.gids);
        self.cgroups(&c.cgroups, &mut m.cgroups);
        self.globs(&c.units, "units", false, &mut m.units);
        m
    }

    fn target(&mut self, target: &Spanned<RawTarget>, resolver: &dyn Resolver) -> TargetMatch {
        let t = target.get_ref();
        let others = t.uids.is_some()
            || t.users.is_some()
            || t.cgroups.is_some()
            || t.units.is_some()
            || t.exes.is_some()
            || t.comms.is_some()
            || t.oom_score_adj.is_some();
        let mut m = TargetMatch {
            any: self.any_flag(&t.any, others, target.span(), "target"),
            ..TargetMatch::default()
        };
        self.ids(&t.uids, "uid", &mut m.uids);
        self.names(&t.users, false, resolver, &mut m.uids);
        self.cgroups(&t.cgroups, &mut m.cgroups);
        self.globs(&t.units, "units", false, &mut m.units);
        self.refuse_exes(&t.exes);
        self.globs(&t.comms, "comms", false, &mut m.comms);
        if let Some(range) = &t.oom_score_adj {
            let r = range.get_ref();
            let (lo, hi) = (r.min.unwrap_or(-1000), r.max.unwrap_or(1000));
            if r.min.is_none() && r.max.is_none() {
                self.err(range.span(), "empty `oom-score-adj` range; give `min`, `max` or both");
            } else if !(-1000..=1000).contains(&lo) || !(-1000..=1000).contains(&hi) {
                self.err(
                    range.span(),
                    format!("bad oom-score-adj range {lo}..{hi}: values lie in -1000..1000"),
                );
            } else if lo > hi {
                self.err(
                    range.span(),
                    format!("bad oom-score-adj range: min {lo} is above max {hi}"),
                );
            } else {
                m.oom_score_adj = Some((lo as i32, hi as i32));
            }
        }
        m
    }
}
