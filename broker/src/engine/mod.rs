// SPDX-License-Identifier: MIT OR Apache-2.0
//! The engine: one implementation of every broker operation, shared by all
//! transports. A transport decodes its request, calls one of these methods
//! with the caller it authenticated at accept, and encodes the result.
//!
//! Request flow: Caller → Target (pin by pidfd) → Policy → Limits → Reaper →
//! Audit. Every decision and every outcome is audited exactly once.

pub mod caller;
pub mod candidates;
pub mod error;
pub mod events;
pub mod group;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod reap_pool;
pub mod reaper;
pub mod reload;
pub mod reply;
pub mod target;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use self::caller::Caller;
use self::candidates::CandidatesReport;
use self::error::EngineError;
use self::events::{EventHub, KillKind, KillRecord, Pool, Subscription, VictimOutcome};
use self::group::{GroupReport, GroupSpec};
use self::limits::{KillLimits, Limiter};
use self::policy::{BrokerFacts, Decision, Policy};
use self::reap_pool::{Ended, ReapOf, REAP_ANSWER_AFTER};
use self::reaper::{KillOptions, Killed, Outcome, ReapJob, ReapReport};
use self::target::{Namespace, TargetProcess, TargetSpec};
use crate::os::features::{KernelFeatures, KillPath};
use std::os::fd::{AsFd, OwnedFd};

/// Longest wait for the target's exit a client may ask for.
pub const MAX_WAIT_FOR_EXIT: Duration = Duration::from_secs(10);

/// Target of audit records, so they can be routed or filtered apart.
pub const AUDIT_TARGET: &str = "reapd::audit";

#[derive(Debug)]
pub struct KillRequest {
    pub target: TargetSpec,
    pub wait_for_exit: Option<Duration>,
    /// An fd of the caller's own pid namespace, which a caller in a child
    /// pid namespace passes (varlink) so its pids can be resolved; verified
    /// before use (`target::verify_caller_pidns`).
    pub pidns: Option<OwnedFd>,
    /// SIGTERM first and SIGKILL after this long (capped at 10 s); `None`:
    /// SIGKILL at once.
    pub grace: Option<Duration>,
    /// Let the process run its exit path this long after SIGKILL before
    /// reaping (capped at 10 s); `None`: the policy's `reap-delay-ms`.
    pub reap_delay: Option<Duration>,
}

#[derive(Debug, Serialize)]
pub struct PermissionReport {
    pub decision: Decision,
    pub target: TargetProcess,
}

#[derive(Debug, Serialize)]
pub struct KillReport {
    pub target: TargetProcess,
    pub rule: String,
    pub reap: ReapReport,
    /// The target was seen gone within the requested wait.
    pub exited: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub broker_version: &'static str,
    pub features: KernelFeatures,
    pub kill_path: KillPath,
}

pub struct Engine {
    /// Shared with the blocking workers and the listeners, never copied.
    features: Arc<KernelFeatures>,
    /// The policy and its limits, swapped together: a request loads one
    /// snapshot and decides and limits with it.
    rules: ArcSwap<Rules>,
    limiter: Arc<Limiter>,
    broker: BrokerFacts,
    /// Kill tasks started and not yet audited; shutdown waits for them.
    kills: Arc<KillTracker>,
    /// Per-uid rate limit on CheckPermission audit records.
    check_audit: CheckAuditGate,
    /// Kill-event subscribers (`WatchKills`).
    events: Arc<EventHub>,
}

/// The policy and the limits of one policy file: replaced together on
/// reload, loaded together by a request.
#[derive(Debug)]
struct Rules {
    policy: Arc<Policy>,
    limits: KillLimits,
}

/// Counts kill tasks in flight so shutdown can wait for each one to finish
/// and write its outcome record.
#[derive(Debug, Default)]
struct KillTracker {
    running: AtomicUsize,
    done: tokio::sync::Notify,
}

/// Held by one kill task; uncounted (and shutdown woken) on drop, whatever
/// way the task ends.
struct KillGuard(Arc<KillTracker>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.done.notify_waiters();
    }
}

/// Records of requests that changed nothing (CheckPermission, and refused
/// kills, group kills and candidate listings) logged per caller uid and
/// action per second; beyond this they are counted and summarised in one
/// `check_suppressed` (checks) or `refusal_suppressed` (refusals) record, so
/// no loop of such requests can push kill records out of the journal.
/// Allowed kills are never limited here (the kill rate limits them).
pub const CHECK_AUDIT_PER_SECOND: u32 = 20;

#[derive(Debug, Default)]
struct CheckAuditGate {
    windows: Mutex<HashMap<(u32, &'static str), CheckWindow>>,
}

#[derive(Debug)]
struct CheckWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl CheckAuditGate {
    /// Whether this check record may be written; writes the summary of the
    /// previous window first when one is due.
    fn admit(&self, uid: u32, action: &'static str) -> bool {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let window = windows.entry((uid, action)).or_insert(CheckWindow {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= Duration::from_secs(1) {
            if window.suppressed > 0 {
                audit_check_summary(uid, action, window.suppressed, now.duration_since(window.started));
            }
            *window = CheckWindow {
                started: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if window.logged < CHECK_AUDIT_PER_SECOND {
            window.logged += 1;
            true
        } else {
            window.suppressed += 1;
            metrics::get().audit_suppressed(1);
            false
        }
    }

    /// Writes the summary of every window that is over (all of them when
    /// `all`, at shutdown) and forgets idle uids.
    fn flush(&self, all: bool) {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows.retain(|(uid, action), window| {
            let over = all || now.duration_since(window.started) >= Duration::from_secs(1);
            if !over {
                return true;
            }
            if window.suppressed > 0 {
                audit_check_summary(*uid, action, window.suppressed, now.duration_since(window.started));
            }
            false
        });
    }
}

impl Engine {
    pub fn new(features: KernelFeatures, policy: Policy, limits: KillLimits) -> Self {
        let cap_kill = features.has_cap_kill;
        Engine {
            features: Arc::new(features),
            rules: ArcSwap::from_pointee(Rules {
                policy: Arc::new(policy),
                limits,
            }),
            limiter: Arc::new(Limiter::default()),
            broker: BrokerFacts {
                pid: std::process::id() as i32,
                cap_kill,
                own_uids: [rustix::process::getuid().as_raw(), rustix::process::geteuid().as_raw()],
            },
            kills: Arc::default(),
            check_audit: CheckAuditGate::default(),
            events: Arc::default(),
        }
    }

    /// Whether a peer known only by its SO_PEERCRED/SO_PEERGROUPS ids may
    /// use the capacity held in reserve: root, or a uid or group that an
    /// allow rule for kill-and-reap names explicitly. Read-only, no /proc:
    /// it runs before a connection is counted. Rules naming callers by
    /// cgroup or unit do not count (those facts need /proc, and can be
    /// forged inside delegated subtrees).
    pub fn holds_kill_grant(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if uid == 0 {
            return true;
        }
        let policy = Arc::clone(&self.rules.load().policy);
        policy.rules().iter().any(|rule| {
            !rule.deny
                && rule.kill
                && !rule.caller.any
                && (rule.caller.uids.iter().any(|s| s.lo <= uid && uid <= s.hi)
                    || rule
                        .caller
                        .gids
                        .iter()
                        .any(|s| std::iter::once(&gid).chain(groups).any(|g| s.lo <= *g && *g <= s.hi)))
        })
    }

    /// Subscribes `caller` to kill events (see [`self::events`]): it
    /// receives one event per later kill of a process it is entitled to
    /// see. Errors: RESOURCE_EXHAUSTED over the subscription caps.
    pub fn watch_kills(&self, caller: &Arc<Caller>) -> Result<Subscription, EngineError> {
        let pool = if caller.uid == 0 && caller.cap_kill {
            Pool::Root
        } else if self.rules.load().policy.metrics_grant(caller).is_some() {
            Pool::Named
        } else {
            Pool::Shared
        };
        let subscription = self.events.subscribe(Arc::clone(caller), pool);
        tracing::info!(
            target: AUDIT_TARGET,
            event = "decision",
            action = "watch",
            caller_pid = caller.pid,
            caller_uid = caller.uid,
            caller_comm = caller.comm.as_str(),
            allowed = subscription.is_ok(),
            reason = %subscription.as_ref().err().map(EngineError::message).unwrap_or_default(),
        );
        subscription
    }

    /// Ends every kill-event subscription and refuses new ones: called at
    /// shutdown, so streams that would never end do not hold it up.
    pub fn close_event_streams(&self) {
        self.events.close();
    }

    /// Kill-event subscriptions open now.
    pub fn event_subscribers(&self) -> usize {
        self.events.subscribers()
    }

    /// Every metric (see [`self::metrics`]), for root and for callers a
    /// `watch` rule names; others get PERMISSION_DENIED (`no-watch-grant`):
    /// the counts cover every caller's kills.
    pub fn metrics(&self, caller: &Caller) -> Result<Vec<metrics::Metric>, EngineError> {
        if self.rules.load().policy.metrics_grant(caller).is_none() {
            return Err(EngineError::PermissionDenied {
                kind: self::policy::DecisionKind::NoRule,
                rule: "no-watch-grant".into(),
                reason: format!(
                    "the broker's metrics count every caller's kills: root or a `watch` grant may read them, not uid {}",
                    caller.uid
                ),
            });
        }
        Ok(metrics::get().snapshot(&[
            ("kills_in_flight", self.kills_in_flight() as u64),
            ("event_subscribers", self.event_subscribers() as u64),
            ("reaps_stalled", u64::from(reap_pool::stalled())),
            ("reaps_running", u64::from(reap_pool::running())),
            ("reaps_waiting", u64::from(reap_pool::waiting())),
        ]))
    }

    /// Kill tasks in flight (started, outcome not yet audited).
    pub fn kills_in_flight(&self) -> usize {
        self.kills.running.load(Ordering::SeqCst)
    }

    /// Waits until every kill task in flight has written its outcome record,
    /// or `timeout` passes; true if none is left. Called at shutdown after
    /// the transports stopped accepting calls; from then on no kill waits
    /// on its victim any more. A reap still running is waited for at most
    /// [`REAP_ANSWER_AFTER`] (its kill is then answered and recorded "reap
    /// pending"); each reap stalled then gets a `reap_pending_at_shutdown`
    /// record, as the broker exits without its end.
    pub async fn drain_kills(&self, timeout: Duration) -> bool {
        let drained = self.drain_kill_tasks(timeout).await;
        for (of, pending_for) in reap_pool::stalled_reaps_at_shutdown() {
            audit_reap_pending_at_shutdown(&of, pending_for);
        }
        drained
    }

    async fn drain_kill_tasks(&self, timeout: Duration) -> bool {
        // Kills in their grace, reap delay or wait for exit go straight on
        // to their end and outcome record (see `target::stop_waiting`).
        target::stop_waiting();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.kills.done.notified();
            if self.kills_in_flight() == 0 {
                self.check_audit.flush(true);
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.kills_in_flight() == 0;
            }
        }
    }

    /// Writes the `check_suppressed` summaries that are due; main calls it
    /// every second so a summary never waits for the uid's next check.
    pub fn flush_audit_summaries(&self) {
        self.check_audit.flush(false);
    }

    pub fn features(&self) -> &Arc<KernelFeatures> {
        &self.features
    }

    /// Replaces the policy and limits atomically: a request sees either the
    /// old pair or the new one, never a mix of the two policies.
    pub fn replace_policy(&self, policy: Policy, limits: KillLimits) {
        self.rules.store(Arc::new(Rules {
            policy: Arc::new(policy),
            limits,
        }));
    }

    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            broker_version: env!("CARGO_PKG_VERSION"),
            features: KernelFeatures::clone(&self.features),
            kill_path: self.features.kill_path(),
        }
    }

    /// The policy's decision, including what the kernel will let the
    /// broker do (degraded mode without CAP_KILL: see `Policy::decide`).
    fn decide(&self, policy: &Policy, caller: &Caller, target: &TargetProcess) -> Decision {
        policy.decide(caller, target, self.broker)
    }

    /// Pins the target `spec` names, in the caller's pid namespace (the
    /// broker's, the one opened at accept, or `pidns`, an fd of it the
    /// caller passed, verified first); `with_memory` as for [`target::pin`].
    ///
    /// On the async worker, not the blocking pool: the pin waits on no other
    /// process (see [`target::pin`]), and a hop to the pool and back costs
    /// two thread hand-offs, more than the pin itself.
    fn pin(
        &self,
        caller: &Caller,
        spec: TargetSpec,
        pidns: Option<OwnedFd>,
        with_memory: bool,
    ) -> Result<TargetProcess, EngineError> {
        let ns = target::caller_namespace(caller, pidns.as_ref())?;
        target::pin(spec, ns, &self.features, with_memory)
    }

    /// The decision KillAndReap would make, with no side effect.
    pub async fn check_permission(&self, caller: &Caller, spec: TargetSpec) -> Result<PermissionReport, EngineError> {
        self.check_permission_in(caller, spec, None).await
    }

    /// [`Engine::check_permission`] with an fd of the caller's pid
    /// namespace, as for [`KillRequest::pidns`].
    pub async fn check_permission_in(
        &self,
        caller: &Caller,
        spec: TargetSpec,
        pidns: Option<OwnedFd>,
    ) -> Result<PermissionReport, EngineError> {
        let started = Instant::now();
        let result = self.check_permission_at(caller, spec, pidns, started).await;
        metrics::get().checked(started.elapsed());
        count_refusal(&result);
        result
    }

    async fn check_permission_at(
        &self,
        caller: &Caller,
        spec: TargetSpec,
        pidns: Option<OwnedFd>,
        started: Instant,
    ) -> Result<PermissionReport, EngineError> {
        let pinned = self.pin(caller, spec, pidns, false);
        let target = match pinned {
            Ok(target) => target,
            Err(err) => {
                if self.check_audit.admit(caller.uid, "check") {
                    audit_refusal("check", caller, &err, started);
                }
                return Err(err);
            }
        };
        // One policy snapshot for both questions: may the caller ask about
        // this target (the `check` grant), and would the kill be allowed.
        let policy = Arc::clone(&self.rules.load().policy);
        if let Some(refusal) = policy.check_refusal(caller, &target) {
            if self.check_audit.admit(caller.uid, "check") {
                audit_decision("check", caller, &target, &refusal, started);
            }
            return Err(EngineError::refused(&refusal));
        }
        let decision = self.decide(&policy, caller, &target);
        if self.check_audit.admit(caller.uid, "check") {
            audit_decision("check", caller, &target, &decision, started);
        }
        Ok(PermissionReport { decision, target })
    }

    /// Kills the target and reaps its memory, if the policy allows.
    pub async fn kill_and_reap(&self, caller: &Caller, request: KillRequest) -> Result<KillReport, EngineError> {
        let started = Instant::now();
        let result = self.kill_and_reap_at(caller, request, started).await;
        count_refusal(&result);
        result
    }

    async fn kill_and_reap_at(
        &self,
        caller: &Caller,
        request: KillRequest,
        started: Instant,
    ) -> Result<KillReport, EngineError> {
        let wait = request.wait_for_exit.map(|w| w.min(MAX_WAIT_FOR_EXIT));
        let target = match self.pin(caller, request.target, request.pidns, true) {
            Ok(target) => target,
            Err(err) => {
                if self.check_audit.admit(caller.uid, "kill") {
                    audit_refusal("kill", caller, &err, started);
                }
                return Err(err);
            }
        };
        let rules = self.rules.load_full();
        let policy = Arc::clone(&rules.policy);
        let decision = self.decide(&policy, caller, &target);
        let policy_reap_delay = policy.reap_delay;
        if !decision.allowed {
            if self.check_audit.admit(caller.uid, "kill") {
                audit_decision("kill", caller, &target, &decision, started);
            }
            return Err(EngineError::refused(&decision));
        }
        // The one decision record is written after the limiter, with the
        // final verdict: allowed by the policy but over the rate is a refusal.
        let in_flight = match self.limiter.acquire(caller.uid, &rules.limits) {
            Ok(slot) => slot,
            Err(err) => {
                let limited = Decision {
                    allowed: false,
                    kind: self::policy::DecisionKind::RateLimited,
                    rule: "rate-limit".into(),
                    reason: format!("{} ({} allows it)", err, decision.rule),
                };
                if self.check_audit.admit(caller.uid, "kill") {
                    audit_decision("kill", caller, &target, &limited, started);
                }
                return Err(err);
            }
        };
        let path = self.features.kill_path();
        let options = KillOptions {
            grace: request.grace.unwrap_or_default().min(reaper::MAX_REAP_DELAY),
            reap_delay: request
                .reap_delay
                .unwrap_or(policy_reap_delay)
                .min(reaper::MAX_REAP_DELAY),
        };
        // A small kill with no waits will want a reaper thread right after
        // its decision record and SIGKILL: wake one now (see
        // `reap_pool::expect`).
        if options.grace.is_zero() && options.reap_delay.is_zero() && is_small_reap(&target) {
            reap_pool::expect();
        }
        audit_decision("kill", caller, &target, &decision, started);

        // Past this point the kill happens and is audited even if the client
        // hangs up: everything from here to the outcome record is one
        // spawned task, which a dropped request future does not cancel.
        let audit_caller = CallerSummary::of(caller);
        let requester = events::requester_of(caller);
        let events = Arc::clone(&self.events);
        let rule = decision.rule;
        self.kills.running.fetch_add(1, Ordering::SeqCst);
        let tracked = KillGuard(Arc::clone(&self.kills));
        let wait = wait.unwrap_or(Duration::ZERO);
        let work = tokio::spawn(async move {
            // Both released when the caller is answered, a stalled reap or
            // not: the reap holds neither (see `reap_pool`).
            let _in_flight = in_flight;
            let _tracked = tracked;
            let (target, killed) = if options.grace.is_zero() && options.reap_delay.is_zero() {
                // A SIGKILL (and a status read if the pin kept none): no
                // wait, so right here on the async worker.
                let killed = reaper::kill(&target, path, options);
                (target, killed)
            } else {
                // SIGTERM and its grace, or the reap delay: waits of up to
                // 10 s each, off the async workers.
                run_in_place(move || {
                    let killed = reaper::kill(&target, path, options);
                    Ok((target, killed))
                })
                .await?
            };
            let reaped = match killed {
                Ok(Killed::Done(report)) => Ok(report),
                Ok(Killed::Reap(job)) => reap(job, &target, &audit_caller, started).await,
                Err(err) => Err(err),
            };
            let reap = match reaped {
                Ok(report) => report,
                Err(err) => {
                    audit_outcome_error(&audit_caller, &target, &err, started);
                    metrics::get().killed(None, path, 0);
                    return Err(err);
                }
            };
            // A pending reap's victim cannot exit before it ends: answer now.
            let exited = if wait.is_zero() || reap.outcome == Outcome::ReapPending {
                false
            } else {
                let pidfd = target
                    .pidfd
                    .try_clone()
                    .map_err(|err| EngineError::Internal(format!("dup of the target's pidfd: {err}")));
                match pidfd {
                    Ok(pidfd) => run_in_place(move || Ok(target::wait_for_exit(pidfd.as_fd(), wait))).await?,
                    Err(_) => false,
                }
            };
            let report = KillReport {
                target,
                rule,
                reap,
                exited,
            };
            audit_outcome(&audit_caller, &report, started);
            metrics::get().killed(
                Some(report.reap.outcome),
                report.reap.kill_path,
                report.reap.bytes_released,
            );
            metrics::get().kill_done(started.elapsed());
            events.publish(
                &policy,
                KillRecord {
                    kind: KillKind::Process,
                    requester,
                    rule: &report.rule,
                    cgroup: "",
                    kill_path: report.reap.kill_path,
                    victims: vec![(
                        &report.target,
                        VictimOutcome {
                            memory_before: report.reap.memory_before,
                            outcome: report.reap.outcome,
                            not_reaped_reason: report.reap.not_reaped_reason.clone(),
                        },
                    )],
                    bytes_released: report.reap.bytes_released,
                    kill_to_reap: report.reap.kill_to_reap,
                    elapsed: started.elapsed(),
                },
            );
            Ok(report)
        });
        work.await
            .unwrap_or_else(|join| Err(EngineError::Internal(format!("kill task failed: {join}"))))
    }
}

/// A reap of at most this much anon + swap at the pin (~0.4 ms at ~10
/// MiB/ms) that got a thread at once is waited for first on the async
/// worker itself, yielding, for at most [`SMALL_REAP_SPIN`]
/// ([`reap_pool::Reap::spin_for`]); then as any other. Why: parked, the
/// worker's wake-up when the reap ends costs a cross-CPU wake (25-35 µs on
/// the VMs measured, issue 17), as much as the reap of a 1 MiB victim;
/// yielding, the reaper thread often runs on this CPU and no wake is
/// needed (KillAndReap p50 -55 to -64 µs side by side, `reapd-bench
/// floor`). The bound keeps what a worker gives a kill to 0.5 ms of CPU,
/// whatever the victim (page tables, a held mmap lock).
const SMALL_REAP_BYTES: u64 = 4 << 20;
const SMALL_REAP_SPIN: Duration = Duration::from_micros(500);

/// At most [`SMALL_REAP_BYTES`] of anon + swap at the pin (unknown: not
/// small): its reap is expected to end within a thread wake-up or two.
fn is_small_reap(target: &TargetProcess) -> bool {
    target.memory.is_some_and(|m| m.reapable_bytes() <= SMALL_REAP_BYTES)
}

/// Runs a killed process's reap on a reaper thread and waits for it at most
/// [`REAP_ANSWER_AFTER`] (see [`reap_pool`]), queueing for a thread
/// included: its report; or "reap pending" with a follow-up record when it
/// ends; or, not started in time (or at once, behind stalled reaps only),
/// no reap at all ("reap skipped", the SIGKILL alone).
async fn reap(
    job: ReapJob,
    target: &TargetProcess,
    caller: &CallerSummary,
    started: Instant,
) -> Result<ReapReport, EngineError> {
    let pending = job.pending_report(reap_pool::pending_reason());
    let of = ReapOf {
        target_pid: target.pid,
        target_uid: target.ruid,
        target_comm: target.comm.clone(),
        namespaced: target.namespaced.unwrap_or(true),
        caller_pid: caller.pid,
        caller_uid: caller.uid,
    };
    let follow_up_of = of.clone();
    let kill_started = job.started();
    let small = is_small_reap(target);
    let deadline = Instant::now() + REAP_ANSWER_AFTER;
    let reap = match reap_pool::submit(of, job) {
        Ok(reap) => reap,
        // The job came back unrun: its SIGKILL (if not sent yet) and no
        // reap. Quick (a signal and /proc/meminfo): in place.
        Err(refused) => return refused.work.skip(refused.reason),
    };
    let follow_up = move |result: Option<Result<ReapReport, EngineError>>| {
        let result = result.unwrap_or_else(|| Err(EngineError::Internal(reap_pool::PANICKED_REASON.into())));
        audit_reap_ended(&follow_up_of, &result, started);
    };
    if small {
        reap.spin_for(SMALL_REAP_SPIN);
    }
    match reap.wait(deadline, follow_up).await {
        Ok(result) => result,
        Err(Ended::NotStarted(refused)) => refused.work.skip(refused.reason),
        Err(Ended::Stalled(_)) => Ok(ReapReport {
            kill_to_reap: kill_started.elapsed(),
            ..pending
        }),
        Err(Ended::Panicked) => Ok(ReapReport {
            outcome: Outcome::KilledNotReaped,
            not_reaped_reason: reap_pool::PANICKED_REASON.into(),
            ..pending
        }),
    }
}

/// A whole-cgroup kill.
#[derive(Debug)]
pub struct GroupKillRequest {
    pub group: GroupSpec,
    /// As for [`KillRequest::pidns`].
    pub pidns: Option<OwnedFd>,
    /// As for [`KillRequest::reap_delay`], for the whole group.
    pub reap_delay: Option<Duration>,
}

impl Engine {
    /// Kills every process of a cgroup and reaps them, all or nothing: each
    /// member is checked as a single kill would be (`Policy::decide`), and
    /// if any is refused nothing is killed and the error names it. Members
    /// that join during the kill are checked as they are found; refused
    /// ones are left alive and reported. One kill for the rate limit.
    pub async fn kill_cgroup(
        &self,
        caller: &Arc<Caller>,
        request: GroupKillRequest,
    ) -> Result<GroupReport, EngineError> {
        let started = Instant::now();
        let result = self.kill_cgroup_at(caller, request, started).await;
        count_refusal(&result);
        result
    }

    async fn kill_cgroup_at(
        &self,
        caller: &Arc<Caller>,
        request: GroupKillRequest,
        started: Instant,
    ) -> Result<GroupReport, EngineError> {
        let action = "kill-cgroup";
        let ns = match owned_namespace(caller, request.pidns.as_ref()) {
            Ok(ns) => ns,
            Err(err) => {
                if self.check_audit.admit(caller.uid, action) {
                    audit_refusal(action, caller, &err, started);
                }
                return Err(err);
            }
        };
        let ns = ns.map(Arc::new);
        let features = Arc::clone(&self.features);
        let group = request.group.clone();
        let pin_ns = ns.clone();
        let pinned = run_blocking(move || {
            let (path, dir) = group::resolve(&group)?;
            let ns = pin_ns
                .as_deref()
                .map_or(Namespace::Broker, |fd| Namespace::Child(fd.as_fd()));
            let members = group::pin_members(&dir, ns, &features)?;
            Ok((path, dir, members))
        })
        .await;
        let (path, dir, members) = match pinned {
            Ok(found) => found,
            Err(err) => {
                if self.check_audit.admit(caller.uid, action) {
                    audit_refusal(action, caller, &err, started);
                }
                return Err(err);
            }
        };
        if members.is_empty() {
            let err = EngineError::NotFound(format!("cgroup {path} has no processes"));
            if self.check_audit.admit(caller.uid, action) {
                audit_refusal(action, caller, &err, started);
            }
            return Err(err);
        }
        let snapshot = self.rules.load_full();
        let policy = Arc::clone(&snapshot.policy);
        // The rules that allowed the members, for the kill event.
        let mut rules = std::collections::BTreeSet::new();
        for member in &members {
            let decision = self.decide(&policy, caller, member);
            if decision.allowed {
                rules.insert(decision.rule.clone());
            } else {
                if self.check_audit.admit(caller.uid, action) {
                    audit_decision(action, caller, member, &decision, started);
                }
                return Err(EngineError::PermissionDenied {
                    kind: decision.kind,
                    rule: decision.rule,
                    reason: format!(
                        "member pid {} ({}, uid {}) of {path} is refused: {}; nothing was killed",
                        member.caller_pid, member.comm, member.ruid, decision.reason
                    ),
                });
            }
        }
        let in_flight = match self.limiter.acquire(caller.uid, &snapshot.limits) {
            Ok(slot) => slot,
            Err(err) => {
                if self.check_audit.admit(caller.uid, action) {
                    audit_refusal(action, caller, &err, started);
                }
                return Err(err);
            }
        };
        tracing::info!(
            target: AUDIT_TARGET,
            event = "decision",
            action,
            caller_pid = caller.pid,
            caller_uid = caller.uid,
            caller_comm = %caller.comm,
            cgroup = %path,
            members = members.len(),
            allowed = true,
            elapsed_us = started.elapsed().as_micros() as u64,
        );
        let options = KillOptions {
            grace: Duration::ZERO,
            reap_delay: request
                .reap_delay
                .unwrap_or(policy.reap_delay)
                .min(reaper::MAX_REAP_DELAY),
        };
        let features = Arc::clone(&self.features);
        let caller = Arc::clone(caller);
        let broker = self.broker;
        let events = Arc::clone(&self.events);
        let event_policy = Arc::clone(&policy);
        let rules = rules.into_iter().collect::<Vec<_>>().join(",");
        let kill_path = self.features.kill_path();
        self.kills.running.fetch_add(1, Ordering::SeqCst);
        let tracked = KillGuard(Arc::clone(&self.kills));
        let work = tokio::spawn(async move {
            let _in_flight = in_flight;
            // Shutdown waits for this group's outcome record too.
            let _tracked = tracked;
            let audit_caller = CallerSummary::of(&caller);
            let requester = events::requester_of(&caller);
            let report = run_blocking(move || {
                let ns = ns
                    .as_deref()
                    .map_or(Namespace::Broker, |fd| Namespace::Child(fd.as_fd()));
                Ok(group::kill_all(
                    path,
                    &dir,
                    members,
                    ns,
                    &features,
                    options,
                    |newcomer| policy.decide(&caller, newcomer, broker).allowed,
                    group::Requester {
                        caller_pid: caller.pid,
                        caller_uid: caller.uid,
                        started,
                    },
                ))
            })
            .await?;
            tracing::info!(
                target: AUDIT_TARGET,
                event = "outcome",
                action = "kill-cgroup",
                caller_pid = audit_caller.pid,
                caller_uid = audit_caller.uid,
                caller_comm = %audit_caller.comm,
                cgroup = %report.cgroup,
                killed = report.members.len(),
                refused_newcomers = report.refused_newcomers.len(),
                passes = report.passes,
                bytes_released = report.bytes_released,
                kill_to_reap_us = report.kill_to_reap.as_micros() as u64,
                elapsed_us = started.elapsed().as_micros() as u64,
            );
            for member in &report.members {
                metrics::get().killed(Some(member.outcome), kill_path, 0);
            }
            metrics::get().killed_bytes(report.bytes_released);
            metrics::get().group_killed(started.elapsed());
            // Entitlement is checked per member and per subscriber: off the
            // executor, as a big group meets many subscribers.
            run_blocking(move || {
                events.publish(
                    &event_policy,
                    KillRecord {
                        kind: KillKind::Cgroup,
                        requester,
                        rule: &rules,
                        cgroup: &report.cgroup,
                        kill_path,
                        victims: report
                            .members
                            .iter()
                            .map(|m| {
                                (
                                    &m.target,
                                    VictimOutcome {
                                        memory_before: m.memory_before,
                                        outcome: m.outcome,
                                        not_reaped_reason: m.not_reaped_reason.clone(),
                                    },
                                )
                            })
                            .collect(),
                        bytes_released: report.bytes_released,
                        kill_to_reap: report.kill_to_reap,
                        elapsed: started.elapsed(),
                    },
                );
                let mut report = report;
                report.truncate_for_reply();
                Ok(report)
            })
            .await
        });
        work.await
            .unwrap_or_else(|join| Err(EngineError::Internal(format!("group kill task failed: {join}"))))
    }
}

impl Engine {
    /// The processes and cgroups `caller` may kill now (see
    /// [`self::candidates`]), one page, ranked as asked.
    pub async fn candidates(
        &self,
        caller: &Arc<Caller>,
        query: candidates::Query,
        pidns: Option<OwnedFd>,
    ) -> Result<CandidatesReport, EngineError> {
        let started = Instant::now();
        // The page size is the API's rule, for every transport.
        if query.limit > candidates::MAX_PAGE {
            return Err(EngineError::invalid(
                "limit",
                format!("limit is at most {}", candidates::MAX_PAGE),
            ));
        }
        let ns = match owned_namespace(caller, pidns.as_ref()) {
            Ok(ns) => ns,
            Err(err) => {
                if self.check_audit.admit(caller.uid, "candidates") {
                    audit_refusal("candidates", caller, &err, started);
                }
                return Err(err);
            }
        };
        let policy = Arc::clone(&self.rules.load().policy);
        let features = Arc::clone(&self.features);
        let caller_for_scan = Arc::clone(caller);
        let broker = self.broker;
        let report = run_blocking(move || {
            let ns = ns.as_ref().map_or(Namespace::Broker, |fd| Namespace::Child(fd.as_fd()));
            Ok(candidates::list(
                &policy,
                &caller_for_scan,
                broker,
                ns,
                &features,
                query,
            ))
        })
        .await?;
        tracing::info!(
            target: AUDIT_TARGET,
            event = "decision",
            action = "candidates",
            caller_pid = caller.pid,
            caller_uid = caller.uid,
            caller_comm = %caller.comm,
            allowed = true,
            listed = report.processes.len(),
            total = report.total,
            elapsed_us = started.elapsed().as_micros() as u64,
        );
        Ok(report)
    }
}

/// Counts a refused request by its decision kind (errors without one, such
/// as a malformed request, are not refusals).
fn count_refusal<T>(result: &Result<T, EngineError>) {
    if let Err(err) = result {
        if let Some((kind, _)) = err.decision() {
            metrics::get().refused(kind);
        }
    }
}

/// The caller fields an outcome record needs, owned so the record can be
/// written after the request that asked for it is gone.
struct CallerSummary {
    pid: i32,
    uid: u32,
    comm: String,
}

impl CallerSummary {
    fn of(caller: &Caller) -> Self {
        CallerSummary {
            pid: caller.pid,
            uid: caller.uid,
            comm: caller.comm.clone(),
        }
    }
}

/// The caller's pid namespace for one request, as an fd the request owns
/// (`None`: the broker's own). Owned because it moves to the blocking pool
/// with the work: a dup of the caller's, whose connection may outlive this
/// request or not.
fn owned_namespace(caller: &Caller, proof: Option<&OwnedFd>) -> Result<Option<OwnedFd>, EngineError> {
    match target::caller_namespace(caller, proof)? {
        Namespace::Broker => Ok(None),
        Namespace::Child(fd) => fd
            .try_clone_to_owned()
            .map(Some)
            .map_err(|err| EngineError::Internal(format!("dup of the caller's pid namespace fd: {err}"))),
    }
}

/// Runs blocking work on the calling thread with
/// [`tokio::task::block_in_place`]: the runtime hands this worker's other
/// tasks to another thread first, so a slow reap stalls no other caller,
/// and the work itself starts with no hop to another thread (each costs
/// 25-30 µs across CPUs, more after idle). On a current-thread runtime
/// (unit tests), where that is impossible, it goes to the blocking pool.
async fn run_in_place<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => run_blocking(work).await,
    }
}

/// Runs blocking syscalls and /proc reads on tokio's blocking pool, so a slow
/// reap never stalls other callers' requests.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(EngineError::Internal(format!("worker failed: {join}"))))
}

fn audit_decision(action: &str, caller: &Caller, target: &TargetProcess, decision: &Decision, started: Instant) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "decision",
        action,
        caller_pid = caller.pid,
        caller_uid = caller.uid,
        caller_real_uid = caller.real_uid,
        caller_comm = caller.comm.as_str(),
        target_pid = target.pid,
        target_caller_pid = target.caller_pid,
        target_uid = target.ruid,
        target_comm = target.comm.as_str(),
        target_start_time = target.start_time,
        allowed = decision.allowed,
        rule = %decision.rule,
        reason = %decision.reason,
        elapsed_us = started.elapsed().as_micros() as u64,
    );
}

fn audit_refusal(action: &str, caller: &Caller, err: &EngineError, started: Instant) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "decision",
        action,
        caller_pid = caller.pid,
        caller_uid = caller.uid,
        caller_comm = caller.comm.as_str(),
        allowed = false,
        reason = %err,
        elapsed_us = started.elapsed().as_micros() as u64,
    );
}

fn audit_outcome(caller: &CallerSummary, report: &KillReport, started: Instant) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "outcome",
        caller_pid = caller.pid,
        caller_uid = caller.uid,
        caller_comm = caller.comm.as_str(),
        target_pid = report.target.pid,
        target_uid = report.target.ruid,
        target_comm = report.target.comm.as_str(),
        outcome = report.reap.outcome.as_str(),
        not_reaped_reason = %report.reap.not_reaped_reason,
        kill_path = report.reap.kill_path.as_str(),
        anon_bytes = report.reap.memory_before.anon_bytes,
        bytes_released = report.reap.bytes_released,
        kill_to_reap_us = report.reap.kill_to_reap.as_micros() as u64,
        reap_retries = report.reap.reap_retries,
        exited = report.exited,
        elapsed_us = started.elapsed().as_micros() as u64,
    );
}

/// The end of a reap whose caller was answered "reap pending": the
/// follow-up of its outcome record (same caller and target fields).
pub(crate) fn audit_reap_ended(of: &ReapOf, result: &Result<ReapReport, EngineError>, started: Instant) {
    if let Ok(reap) = result {
        metrics::get().killed_bytes(reap.bytes_released);
    }
    let failed = result.as_ref().err().map(EngineError::to_string);
    audit_reap(
        "reap_ended",
        of,
        result.as_ref().ok(),
        failed.as_deref(),
        started.elapsed(),
    );
}

/// A reap still stalled when the broker stops: it exits without its end
/// (the thread dies with the process), so this is its last record.
fn audit_reap_pending_at_shutdown(of: &ReapOf, pending_for: Duration) {
    audit_reap("reap_pending_at_shutdown", of, None, None, pending_for);
}

/// A record of a reap after its kill's outcome record: its result (`reap`),
/// its error (`failed`), or neither (still pending).
fn audit_reap(event: &str, of: &ReapOf, reap: Option<&ReapReport>, failed: Option<&str>, elapsed: Duration) {
    let outcome = match (reap, failed) {
        (Some(reap), _) => reap.outcome.as_str(),
        (None, Some(_)) => "failed",
        (None, None) => Outcome::ReapPending.as_str(),
    };
    tracing::info!(
        target: AUDIT_TARGET,
        event,
        caller_pid = of.caller_pid,
        caller_uid = of.caller_uid,
        target_pid = of.target_pid,
        target_uid = of.target_uid,
        target_comm = of.target_comm.as_str(),
        outcome,
        not_reaped_reason = reap.map_or("", |r| r.not_reaped_reason.as_str()),
        error = failed.unwrap_or_default(),
        kill_path = reap.map_or("", |r| r.kill_path.as_str()),
        bytes_released = reap.map_or(0, |r| r.bytes_released),
        kill_to_reap_us = reap.map_or(0, |r| r.kill_to_reap.as_micros() as u64),
        reap_retries = reap.map_or(0, |r| r.reap_retries),
        elapsed_us = elapsed.as_micros() as u64,
    );
}

fn audit_check_summary(uid: u32, action: &str, suppressed: u64, window: Duration) {
    // Checks keep their own event name; refusals of other actions share one.
    let event = if action == "check" {
        "check_suppressed"
    } else {
        "refusal_suppressed"
    };
    tracing::info!(
        target: AUDIT_TARGET,
        event,
        action,
        caller_uid = uid,
        suppressed,
        window_ms = window.as_millis() as u64,
        limit_per_second = CHECK_AUDIT_PER_SECOND,
    );
}

fn audit_outcome_error(caller: &CallerSummary, target: &TargetProcess, err: &EngineError, started: Instant) {
    tracing::warn!(
        target: AUDIT_TARGET,
        event = "outcome",
        caller_pid = caller.pid,
        caller_uid = caller.uid,
        caller_comm = caller.comm.as_str(),
        target_pid = target.pid,
        target_uid = target.ruid,
        target_comm = target.comm.as_str(),
        outcome = "failed",
        error = %err,
        elapsed_us = started.elapsed().as_micros() as u64,
    );
}
