//! The configuration file (TOML). Every problem is reported at once, each
//! as `file:line:col: message`, like the broker's policy parser: fields a
//! check may complain about are `Spanned`, and unknown keys are refused by
//! `deny_unknown_fields`, which the `toml` crate reports with a span.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reapd_client::SortKey;
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

/// One problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// A file that cannot be used; displays one `file:line:col: message` line
/// per problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render(.path, .problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}:{}:{}: {}", path.display(), p.line, p.col, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- the file as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    socket: Option<Spanned<String>>,
    scope: Option<RawScope>,
    trigger: Option<RawTrigger>,
    kill: Option<RawKill>,
    notify: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawScope {
    cgroup: Option<Spanned<String>>,
    memory_cgroup: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTrigger {
    mem_available_percent: Option<Spanned<f64>>,
    swap_free_percent: Option<Spanned<f64>>,
    psi: Option<Spanned<RawPsi>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPsi {
    enabled: Option<bool>,
    level: Option<Spanned<String>>,
    stall_ms: Option<Spanned<i64>>,
    window_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKill {
    mode: Option<Spanned<String>>,
    rank_by: Option<Spanned<String>>,
    prefer: Option<RawMatch>,
    avoid: Option<RawMatch>,
    ignore: Option<RawMatch>,
    grace_ms: Option<Spanned<i64>>,
    reap_delay_ms: Option<Spanned<i64>>,
    cooldown_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMatch {
    comm: Option<Vec<Spanned<String>>>,
    cgroup: Option<Vec<Spanned<String>>>,
}

// ---- the validated configuration ----

/// Kill one process at a time, or a whole cgroup (all or nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Process,
    Cgroup,
}

/// PSI `some` (at least one task stalled) or `full` (all non-idle tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsiLevel {
    Some,
    Full,
}

/// A PSI trigger: fire when tasks stall on memory for `stall` within any
/// `window` (the kernel's trigger syntax `some|full STALL_US WINDOW_US`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Psi {
    pub level: PsiLevel,
    pub stall: Duration,
    pub window: Duration,
}

/// Regexes on a candidate's comm and cgroup path; either matching is a
/// match.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    pub comm: Vec<Regex>,
    pub cgroup: Vec<Regex>,
}

impl Matcher {
    pub fn matches(&self, comm: &str, cgroup: &str) -> bool {
        self.comm.iter().any(|r| r.is_match(comm)) || self.cgroup.iter().any(|r| r.is_match(cgroup))
    }

    pub fn is_empty(&self) -> bool {
        self.comm.is_empty() && self.cgroup.is_empty()
    }
}

/// The validated configuration; [`Config::default`] is an empty file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The broker's gRPC socket.
    pub socket: PathBuf,
    /// Watch and act in this cgroup subtree (a path below the cgroup2 root,
    /// as `/proc/self/cgroup` shows it); `None`: the whole machine.
    pub scope: Option<String>,
    /// Where the scope's memory limit and usage are read when not the
    /// scope itself: on a hybrid host whose memory controller is on cgroup
    /// v1, the path in the v1 memory hierarchy. `None`: the scope.
    pub memory_cgroup: Option<String>,
    /// Kill when available memory is below this percentage (machine:
    /// MemAvailable of MemTotal; cgroup: the limit minus usage plus
    /// inactive file cache, of the limit).
    pub mem_available_percent: f64,
    /// ... and SwapFree is below this percentage of SwapTotal (machine
    /// only; met when there is no swap).
    pub swap_free_percent: f64,
    /// `None`: no PSI trigger.
    pub psi: Option<Psi>,
    pub mode: Mode,
    pub rank_by: SortKey,
    /// Tried first.
    pub prefer: Matcher,
    /// Tried only when nothing else is left.
    pub avoid: Matcher,
    /// Never killed by this killer.
    pub ignore: Matcher,
    /// SIGTERM first, SIGKILL + reap after this long (process mode only).
    pub grace: Option<Duration>,
    /// `None`: the broker policy's `reap-delay-ms`.
    pub reap_delay: Option<Duration>,
    /// After a kill, the next check waits at least this long.
    pub cooldown: Duration,
    /// A program (and its arguments) run after each kill with the kill's
    /// JSON line on stdin.
    pub notify: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(reapd_client::DEFAULT_SOCKET),
            scope: None,
            memory_cgroup: None,
            mem_available_percent: 10.0,
            swap_free_percent: 10.0,
            psi: Some(Psi {
                level: PsiLevel::Full,
                stall: Duration::from_millis(200),
                window: Duration::from_secs(2),
            }),
            mode: Mode::Process,
            rank_by: SortKey::Unique,
            prefer: Matcher::default(),
            avoid: Matcher::default(),
            ignore: Matcher::default(),
            grace: None,
            reap_delay: None,
            cooldown: Duration::from_millis(200),
            notify: Vec::new(),
        }
    }
}

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    })
}

/// Validates `text`; every problem at once (after a syntax error, only it).
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            return Err(vec![problem(text, at, e.message().to_string())]);
        }
    };
    let mut v = Validator {
        text,
        problems: Vec::new(),
    };
    let mut config = Config::default();
    if let Some(socket) = raw.socket {
        if socket.get_ref().is_empty() {
            v.fail(socket.span(), "socket must not be empty");
        }
        config.socket = PathBuf::from(socket.into_inner());
    }
    let scope = raw.scope.unwrap_or_default();
    if let Some(cgroup) = scope.cgroup {
        config.scope = Some(v.cgroup_path(cgroup, "scope.cgroup"));
    }
    if let Some(cgroup) = scope.memory_cgroup {
        config.memory_cgroup = Some(v.cgroup_path(cgroup, "scope.memory-cgroup"));
    }
    if config.memory_cgroup.is_some() && config.scope.is_none() {
        v.fail(0..0, "scope.memory-cgroup needs scope.cgroup");
    }
    let trigger = raw.trigger.unwrap_or_default();
    if let Some(p) = trigger.mem_available_percent {
        config.mem_available_percent = v.percent(&p, "mem-available-percent");
    }
    if let Some(p) = trigger.swap_free_percent {
        config.swap_free_percent = v.percent(&p, "swap-free-percent");
    }
    if let Some(psi) = trigger.psi {
        config.psi = v.psi(&psi, config.psi.expect("default has PSI"));
    }
    let kill = raw.kill.unwrap_or_default();
    if let Some(mode) = &kill.mode {
        config.mode = match mode.get_ref().as_str() {
            "process" => Mode::Process,
            "cgroup" => Mode::Cgroup,
            other => {
                v.fail(
                    mode.span(),
                    &format!("unknown mode {other:?}: \"process\" or \"cgroup\""),
                );
                Mode::Process
            }
        };
    }
    if let Some(rank) = kill.rank_by {
        match rank.get_ref().parse::<SortKey>() {
            Ok(SortKey::StartTime) | Err(_) => v.fail(
                rank.span(),
                &format!(
                    "unknown rank-by {:?}: \"unique\", \"anon\", \"rss\", \"swap\" or \"oom_score\"",
                    rank.get_ref()
                ),
            ),
            Ok(key) => config.rank_by = key,
        }
    }
    config.prefer = v.matcher(kill.prefer);
    config.avoid = v.matcher(kill.avoid);
    config.ignore = v.matcher(kill.ignore);
    config.grace = kill.grace_ms.map(|g| v.millis(&g, "grace-ms", 1, 10_000));
    if config.grace.is_some() && config.mode == Mode::Cgroup {
        let span = kill.mode.as_ref().map(|m| m.span()).unwrap_or(0..0);
        v.fail(
            span,
            "grace-ms applies to mode = \"process\" only (a cgroup kill is SIGKILL)",
        );
    }
    config.reap_delay = kill.reap_delay_ms.map(|d| v.millis(&d, "reap-delay-ms", 0, 10_000));
    if let Some(c) = kill.cooldown_ms {
        config.cooldown = v.millis(&c, "cooldown-ms", 0, 60_000);
    }
    if let Some(notify) = raw.notify {
        if notify.get_ref().is_empty() || notify.get_ref()[0].get_ref().is_empty() {
            v.fail(
                notify.span(),
                "notify must name a program: [\"/usr/bin/prog\", \"arg\", ...]",
            );
        }
        config.notify = notify.into_inner().into_iter().map(Spanned::into_inner).collect();
    }
    if v.problems.is_empty() {
        Ok(config)
    } else {
        v.problems.sort_by_key(|p| (p.line, p.col));
        Err(v.problems)
    }
}

struct Validator<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn fail(&mut self, span: Range<usize>, message: &str) {
        self.problems.push(problem(self.text, span.start, message.to_string()));
    }

    fn cgroup_path(&mut self, cgroup: Spanned<String>, key: &str) -> String {
        let span = cgroup.span();
        let path = cgroup.into_inner();
        let bad = !path.starts_with('/')
            || path.len() > 1 && path.ends_with('/')
            || path
                .split('/')
                .skip(1)
                .any(|c| c == "." || c == ".." || (c.is_empty() && path != "/"));
        if bad {
            self.fail(
                span,
                &format!("{key} must be an absolute cgroup path like \"/user.slice\" (no \".\", \"..\", \"//\" or trailing \"/\")"),
            );
        }
        path
    }

    fn percent(&mut self, p: &Spanned<f64>, key: &str) -> f64 {
        let value = *p.get_ref();
        if !(0.0..=100.0).contains(&value) {
            self.fail(p.span(), &format!("{key} must be between 0 and 100"));
        }
        value
    }

    fn millis(&mut self, ms: &Spanned<i64>, key: &str, min: i64, max: i64) -> Duration {
        let value = *ms.get_ref();
        if !(min..=max).contains(&value) {
            self.fail(ms.span(), &format!("{key} must be between {min} and {max}"));
        }
        Duration::from_millis(value.clamp(0, max) as u64)
    }

    fn psi(&mut self, raw: &Spanned<RawPsi>, default: Psi) -> Option<Psi> {
        let r = raw.get_ref();
        if r.enabled == Some(false) {
            return None;
        }
        let mut psi = default;
        if let Some(level) = &r.level {
            psi.level = match level.get_ref().as_str() {
                "some" => PsiLevel::Some,
                "full" => PsiLevel::Full,
                other => {
                    self.fail(level.span(), &format!("unknown level {other:?}: \"some\" or \"full\""));
                    psi.level
                }
            };
        }
        // The kernel accepts windows of 500 ms to 10 s; an unprivileged
        // trigger's window must be a multiple of 2 s.
        if let Some(w) = &r.window_ms {
            psi.window = self.millis(w, "window-ms", 500, 10_000);
        }
        if let Some(s) = &r.stall_ms {
            psi.stall = self.millis(s, "stall-ms", 1, 10_000);
            if psi.stall >= psi.window {
                self.fail(s.span(), "stall-ms must be less than window-ms");
            }
        }
        Some(psi)
    }

    fn matcher(&mut self, raw: Option<RawMatch>) -> Matcher {
        let raw = raw.unwrap_or_default();
        let mut compile = |list: Option<Vec<Spanned<String>>>| -> Vec<Regex> {
            list.unwrap_or_default()
                .into_iter()
                .filter_map(|r| match Regex::new(r.get_ref()) {
                    Ok(re) => Some(re),
                    Err(e) => {
                        let first = e.to_string().lines().last().unwrap_or_default().trim().to_string();
                        self.fail(r.span(), &format!("bad regex: {first}"));
                        None
                    }
                })
                .collect()
        };
        Matcher {
            comm: compile(raw.comm),
            cgroup: compile(raw.cgroup),
        }
    }
}

/// A problem at byte `offset` of `text`, with 1-based line and column
/// (columns count characters).
fn problem(text: &str, offset: usize, message: String) -> Problem {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
    Problem { line, col, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| format!("{}:{}: {}", p.line, p.col, p.message))
            .collect()
    }

    #[test]
    fn an_empty_file_is_the_default() {
        let c = parse("").unwrap();
        assert_eq!(c.mode, Mode::Process);
        assert_eq!(c.mem_available_percent, 10.0);
        assert!(c.psi.is_some());
    }

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            r#"
socket = "/run/x.sock"
notify = ["/usr/bin/logger", "-t", "lmk"]
[scope]
cgroup = "/user.slice"
[trigger]
mem-available-percent = 5.5
swap-free-percent = 20
psi = { level = "some", stall-ms = 100, window-ms = 2000 }
[kill]
mode = "cgroup"
rank-by = "oom_score"
prefer = { comm = ["^chrom"] }
avoid = { cgroup = ["/db\\.service$"] }
ignore = { comm = ["^sshd$"], cgroup = ["^/system\\.slice/"] }
reap-delay-ms = 2000
cooldown-ms = 50
"#,
        )
        .unwrap();
        assert_eq!(c.scope.as_deref(), Some("/user.slice"));
        assert_eq!(c.mode, Mode::Cgroup);
        assert_eq!(c.rank_by, SortKey::OomScore);
        assert_eq!(c.psi.unwrap().level, PsiLevel::Some);
        assert!(c.prefer.matches("chromium", "/x"));
        assert!(c.avoid.matches("x", "/system.slice/db.service"));
        assert_eq!(c.notify.len(), 3);
        assert_eq!(c.reap_delay, Some(Duration::from_secs(2)));
    }

    #[test]
    fn every_problem_is_reported_at_its_line_and_column() {
        let got = problems(
            "[trigger]\nmem-available-percent = 150\npsi = { level = \"half\", stall-ms = 3000, window-ms = 2000 }\n[kill]\nmode = \"all\"\nprefer = { comm = [\"(\"] }\nrank-by = \"start_time\"\n[scope]\ncgroup = \"user.slice/../x\"\n",
        );
        assert_eq!(
            got,
            vec![
                "2:25: mem-available-percent must be between 0 and 100",
                "3:17: unknown level \"half\": \"some\" or \"full\"",
                "3:36: stall-ms must be less than window-ms",
                "5:8: unknown mode \"all\": \"process\" or \"cgroup\"",
                "6:20: bad regex: error: unclosed group",
                "7:11: unknown rank-by \"start_time\": \"unique\", \"anon\", \"rss\", \"swap\" or \"oom_score\"",
                "9:10: scope.cgroup must be an absolute cgroup path like \"/user.slice\" (no \".\", \"..\", \"//\" or trailing \"/\")",
            ]
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_point_at_themselves() {
        assert_eq!(
            problems("[kill]\nmodee = \"process\"\n")[0]
                .split(':')
                .take(2)
                .collect::<Vec<_>>(),
            ["2", "1"]
        );
        let syntax = problems("[trigger\n");
        assert_eq!(syntax.len(), 1);
        assert!(syntax[0].starts_with("1:"), "{syntax:?}");
    }
}
