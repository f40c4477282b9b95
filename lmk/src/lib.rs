//! reapd-lmk: a low-memory killer that holds no privilege. It watches
//! memory (earlyoom-style MemAvailable/SwapFree thresholds, or a cgroup's
//! limit) and PSI, and when memory runs low asks the reapd broker which
//! processes it may kill, picks one by its prefer/avoid/ignore rules, and has
//! the broker kill and reap it. Everything it may do is what the broker's
//! policy grants its uid; it never signals a process itself.
//!
//! Every kill (or, with `--dry-run`, every would-be kill) is one JSON line on
//! stdout, see [`KillEvent`].

#![forbid(unsafe_code)]

pub mod config;
pub mod select;
pub mod watch;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reapd_client::manager::{Candidate, CandidatesQuery, Group, KillOptions};
use reapd_client::{blocking, Error as ClientError, MemoryUsage, Target};
use serde::Serialize;

use config::{Config, Mode};
use select::Tier;
use watch::{MemoryState, Source, Trigger, Wake, WatchError};

/// Why the killer could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("broker: {0}")]
    Broker(#[from] ClientError),
}

/// What set a kill off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Available memory (and swap) below the thresholds.
    LowMemory,
    /// The PSI trigger fired.
    Pressure,
}

/// One line of the killer's event stream (stdout, one JSON object a line).
#[derive(Debug, Clone, Serialize)]
pub struct KillEvent {
    /// "kill", "would_kill" (`--dry-run`) or "no_candidate".
    pub event: &'static str,
    /// Seconds since the epoch.
    pub time: f64,
    pub cause: Cause,
    /// The memory figures that decided, in bytes.
    pub memory: MemoryState,
    pub available_percent: f64,
    /// "process" or "cgroup".
    pub mode: &'static str,
    pub tier: Option<Tier>,
    pub pid: Option<i32>,
    pub uid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    /// Processes killed (1 in process mode).
    pub processes: u32,
    /// What the victim held before (process mode: the broker's figure;
    /// cgroup mode: the sum over members).
    pub memory_before: Option<MemoryUsage>,
    /// What the kill gave back to the system, as the broker reports it.
    pub bytes_released: u64,
    pub kill_to_reap_ms: f64,
    /// The broker's outcome ("reaped", ...); empty for a dry run.
    pub outcome: String,
    /// The policy rule that allowed it.
    pub rule: String,
    /// From the decision to kill to the broker's reply.
    pub decision_to_reply_ms: f64,
    /// Of which listing the candidates (every page).
    pub candidates_ms: f64,
}

/// The killer: a broker connection, a memory source, a PSI trigger.
pub struct Killer {
    pub config: Config,
    pub dry_run: bool,
    client: blocking::Client,
    source: Source,
    trigger: Option<Trigger>,
    out: Box<dyn Write + Send>,
}

/// The broker's candidates, every page.
fn all_candidates(client: &mut blocking::Client, config: &Config) -> Result<reapd_client::Candidates, ClientError> {
    let mut query = CandidatesQuery {
        sort_by: config.rank_by,
        limit: 1000,
        offset: 0,
    };
    let mut all = client.list_candidates(query)?;
    while let Some(next) = all.next_offset {
        query.offset = next;
        let page = client.list_candidates(query)?;
        all.processes.extend(page.processes);
        all.next_offset = page.next_offset;
    }
    Ok(all)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// A refusal or a vanished victim: try the next candidate.
fn try_next(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::PermissionDenied(_) | ClientError::ProcessChanged(_) | ClientError::NotFound(_)
    )
}

impl Killer {
    /// Connects to the broker, finds the memory figures, arms the PSI
    /// trigger; `out` receives the event lines.
    pub fn new(config: Config, dry_run: bool, out: Box<dyn Write + Send>) -> Result<Killer, RunError> {
        let source = Source::for_scope(config.memory_cgroup.as_deref().or(config.scope.as_deref()))?;
        source.read()?;
        // Kernels before 6.5 refuse unprivileged PSI triggers (EPERM), and
        // a cgroup's memory.pressure may not be delegated: the thresholds
        // still work, so the killer carries on with them alone.
        let trigger = match config.psi {
            Some(psi) => match Trigger::arm(config.scope.as_deref(), psi) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "no PSI trigger; deciding on the memory thresholds alone");
                    None
                }
            },
            None => None,
        };
        let mut client = blocking::Client::connect(&config.socket)?;
        let caps = client.capabilities()?;
        tracing::info!(
            socket = %config.socket.display(),
            kill_path = %caps.kill_path,
            source = ?source,
            psi = ?trigger.as_ref().map(|t| t.path.display().to_string()),
            dry_run,
            "watching"
        );
        Ok(Killer {
            config,
            dry_run,
            client,
            source,
            trigger,
            out,
        })
    }

    /// Runs until an error; `max_kills` stops it after that many kills (or
    /// would-be kills).
    pub fn run(&mut self, max_kills: Option<u64>) -> Result<(), RunError> {
        let mut timeout = Duration::ZERO;
        let mut psi_quiet_until = Instant::now();
        let mut kills = 0u64;
        let mut reported_nothing = false;
        loop {
            let wake = watch::wait(self.trigger.as_ref(), timeout)?;
            let state = self.source.read()?;
            let cause = if state.low(self.config.mem_available_percent, self.config.swap_free_percent) {
                Some(Cause::LowMemory)
            } else if wake == Wake::Pressure && Instant::now() >= psi_quiet_until {
                Some(Cause::Pressure)
            } else {
                None
            };
            timeout = watch::next_check(&state, self.config.mem_available_percent);
            let Some(cause) = cause else {
                reported_nothing = false;
                continue;
            };
            match self.act(cause, state) {
                Ok(Some(event)) => {
                    reported_nothing = false;
                    kills += 1;
                    self.emit(&event);
                    // Stalls from before the kill stay in the PSI window.
                    if let Some(t) = &self.trigger {
                        psi_quiet_until = Instant::now() + t.psi.window;
                    }
                    timeout = if self.dry_run {
                        self.config.cooldown.max(Duration::from_secs(1))
                    } else {
                        self.config.cooldown
                    };
                    if max_kills.is_some_and(|m| kills >= m) {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    if !reported_nothing {
                        tracing::warn!(
                            ?cause,
                            "memory is low but the broker lists nothing this killer may kill"
                        );
                        reported_nothing = true;
                    }
                }
                Err(ClientError::RateLimited { retry_after, message }) => {
                    tracing::warn!(%message, "rate limited by the broker");
                    timeout = retry_after.unwrap_or(Duration::from_secs(1));
                }
                Err(e) => tracing::error!(error = %e, "broker call failed; retrying at the next check"),
            }
        }
    }

    /// Picks and kills one victim; `None`: nothing to kill.
    fn act(&mut self, cause: Cause, state: MemoryState) -> Result<Option<KillEvent>, ClientError> {
        let decided = Instant::now();
        let candidates = all_candidates(&mut self.client, &self.config)?;
        let candidates_ms = decided.elapsed().as_secs_f64() * 1e3;
        let mut event = KillEvent {
            event: if self.dry_run { "would_kill" } else { "kill" },
            time: now_secs(),
            cause,
            memory: state,
            available_percent: state.available_percent(),
            mode: match self.config.mode {
                Mode::Process => "process",
                Mode::Cgroup => "cgroup",
            },
            tier: None,
            pid: None,
            uid: None,
            comm: None,
            cgroup: None,
            processes: 0,
            memory_before: None,
            bytes_released: 0,
            kill_to_reap_ms: 0.0,
            outcome: String::new(),
            rule: String::new(),
            decision_to_reply_ms: 0.0,
            candidates_ms,
        };
        match self.config.mode {
            Mode::Process => {
                for (tier, c) in select::processes(&self.config, &candidates.processes) {
                    let p = &c.process;
                    event.tier = Some(tier);
                    event.pid = Some(p.pid);
                    event.uid = Some(p.uid);
                    event.comm = Some(p.comm.clone());
                    event.cgroup = Some(p.cgroup.clone());
                    event.processes = 1;
                    event.memory_before = Some(c.memory);
                    event.rule = c.rule.clone();
                    if self.dry_run {
                        return Ok(Some(event));
                    }
                    match self.kill_process(c) {
                        Ok(report) => {
                            event.memory_before = Some(report.memory_before);
                            event.bytes_released = report.bytes_released;
                            event.kill_to_reap_ms = report.kill_to_reap_ns as f64 / 1e6;
                            event.outcome = report.outcome.to_string();
                            event.rule = report.rule;
                            event.decision_to_reply_ms = decided.elapsed().as_secs_f64() * 1e3;
                            return Ok(Some(event));
                        }
                        Err(e) if try_next(&e) => {
                            tracing::info!(pid = p.pid, error = %e, "candidate not killed; trying the next");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Mode::Cgroup => {
                for (tier, g) in select::cgroups(&self.config, &candidates.cgroups, &candidates.processes) {
                    event.tier = Some(tier);
                    event.cgroup = Some(g.cgroup.clone());
                    event.processes = g.processes;
                    event.memory_before = Some(g.memory);
                    if self.dry_run {
                        return Ok(Some(event));
                    }
                    match self
                        .client
                        .kill_cgroup(Group::Cgroup(g.cgroup.clone()), self.config.reap_delay)
                    {
                        Ok(report) => {
                            event.processes = report.members.len() as u32;
                            event.bytes_released = report.bytes_released;
                            event.kill_to_reap_ms = report.kill_to_reap_ns as f64 / 1e6;
                            event.outcome = "killed".into();
                            event.decision_to_reply_ms = decided.elapsed().as_secs_f64() * 1e3;
                            return Ok(Some(event));
                        }
                        Err(e) if try_next(&e) => {
                            tracing::info!(cgroup = %g.cgroup, error = %e, "group not killed; trying the next");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(None)
    }

    fn kill_process(&mut self, c: &Candidate) -> Result<reapd_client::KillReport, ClientError> {
        let p = &c.process;
        // Pinned to the start time the broker listed: a recycled pid is
        // refused, not killed.
        let target = Target::with_start_time(p.pid, p.start_time);
        self.client.kill_and_reap_with(
            target,
            KillOptions {
                wait_for_exit: None,
                grace: self.config.grace,
                reap_delay: self.config.reap_delay,
            },
        )
    }

    /// The JSON line on `out`, a log line, and the notify hook.
    fn emit(&mut self, event: &KillEvent) {
        let line = serde_json::to_string(event).unwrap_or_default();
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        tracing::warn!(
            "{} {} ({}) uid {} in {}: {:.1} MiB released in {:.1} ms; available {:.1}% ({:?}, {:?})",
            event.event.replace('_', " "),
            event.pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "cgroup".into()),
            event.comm.as_deref().unwrap_or("-"),
            event.uid.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
            event.cgroup.as_deref().unwrap_or("-"),
            mib(event.bytes_released),
            event.kill_to_reap_ms,
            event.available_percent,
            event.cause,
            event.tier,
        );
        if let Some((program, args)) = self.config.notify.split_first() {
            notify(program, args, &line);
        }
    }
}

/// Runs the notify hook with the event on stdin, without waiting for it
/// (a thread reaps it, so a slow notifier never delays the next kill).
fn notify(program: &str, args: &[String], line: &str) {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn();
    match child {
        Ok(mut child) => {
            let line = format!("{line}\n");
            std::thread::spawn(move || {
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = stdin.write_all(line.as_bytes());
                }
                let _ = child.wait();
            });
        }
        Err(e) => tracing::error!(program, error = %e, "notify hook failed to start"),
    }
}
