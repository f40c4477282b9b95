//! The engine: one implementation of every broker operation, shared by all
//! transports. A transport decodes its request, calls one of these methods
//! with the caller it authenticated at accept, and encodes the result.
//!
//! Request flow: Caller → Target (pin by pidfd) → Policy → Limits → Reaper →
//! Audit. Every decision and every outcome is audited exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::caller::Caller;
use crate::error::EngineError;
use crate::features::{KernelFeatures, KillPath};
use crate::limits::{KillLimits, Limiter};
use crate::policy::{BrokerFacts, Decision, Policy};
use crate::reaper::{self, ReapReport};
use crate::target::{self, Namespace, TargetProcess, TargetSpec};
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
    policy: ArcSwap<Policy>,
    limits: ArcSwap<KillLimits>,
    limiter: Arc<Limiter>,
    broker: BrokerFacts,
    /// The broker's real and effective uid, read once: the engine is built
    /// after any `--user` switch, and the uids never change afterwards.
    /// Without CAP_KILL these are the only uids the kernel lets it signal.
    own_uids: [u32; 2],
}

impl Engine {
    pub fn new(features: KernelFeatures, policy: Policy, limits: KillLimits) -> Self {
        Engine {
            features: Arc::new(features),
            policy: ArcSwap::from_pointee(policy),
            limits: ArcSwap::from_pointee(limits),
            limiter: Arc::new(Limiter::default()),
            broker: BrokerFacts {
                pid: std::process::id() as i32,
            },
            own_uids: [rustix::process::getuid().as_raw(), rustix::process::geteuid().as_raw()],
        }
    }

    pub fn features(&self) -> &Arc<KernelFeatures> {
        &self.features
    }

    /// Replaces the policy and limits atomically: a request sees either the
    /// old pair or the new one, never a mix of the two policies.
    pub fn replace_policy(&self, policy: Policy, limits: KillLimits) {
        self.policy.store(Arc::new(policy));
        self.limits.store(Arc::new(limits));
    }

    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            broker_version: env!("CARGO_PKG_VERSION"),
            features: KernelFeatures::clone(&self.features),
            kill_path: self.features.kill_path(),
        }
    }

    /// The policy's decision, refined by what the kernel will let the broker
    /// do: without CAP_KILL (degraded mode) the broker can signal only
    /// processes whose real or saved uid is its own real or effective uid,
    /// so a kill the policy allows may still be impossible. Saying so here
    /// keeps CheckPermission and KillAndReap in agreement.
    fn decide(&self, policy: &Policy, caller: &Caller, target: &TargetProcess) -> Decision {
        let decision = policy.decide(caller, target, self.broker);
        if !decision.allowed || self.features.has_cap_kill {
            return decision;
        }
        if self
            .own_uids
            .iter()
            .any(|uid| *uid == target.ruid || *uid == target.suid)
        {
            return decision;
        }
        Decision {
            allowed: false,
            rule: "degraded:no-cap-kill".into(),
            reason: format!(
                "the policy allows it ({}), but the broker runs without CAP_KILL (degraded mode) and the kernel \
                 lets it kill only its own uid's processes, not uid {}",
                decision.rule, target.ruid
            ),
        }
    }

    /// Pins the target `spec` names, in the caller's pid namespace (the
    /// broker's, the one opened at accept, or `pidns`, an fd of it the
    /// caller passed, verified first).
    async fn pin(
        &self,
        caller: &Caller,
        spec: TargetSpec,
        pidns: Option<OwnedFd>,
    ) -> Result<TargetProcess, EngineError> {
        // The namespace fd moves to the blocking pool with the work: a dup
        // of the caller's, whose connection may outlive this request or not.
        let ns = match target::caller_namespace(caller, pidns.as_ref())? {
            Namespace::Broker => None,
            Namespace::Child(fd) => Some(
                fd.try_clone_to_owned()
                    .map_err(|err| EngineError::Internal(format!("dup of the caller's pid namespace fd: {err}")))?,
            ),
        };
        let features = Arc::clone(&self.features);
        run_blocking(move || {
            let ns = ns.as_ref().map_or(Namespace::Broker, |fd| Namespace::Child(fd.as_fd()));
            target::pin(spec, ns, &features)
        })
        .await
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
        let pinned = self.pin(caller, spec, pidns).await;
        let target = match pinned {
            Ok(target) => target,
            Err(err) => {
                audit_refusal("check", caller, &err, started);
                return Err(err);
            }
        };
        // One policy snapshot for both questions: may the caller ask about
        // this target (the `check` grant), and would the kill be allowed.
        let policy = self.policy.load();
        if let Some(refusal) = policy.check_refusal(caller, &target) {
            audit_decision("check", caller, &target, &refusal, started);
            return Err(EngineError::PermissionDenied(refusal.reason));
        }
        let decision = self.decide(&policy, caller, &target);
        audit_decision("check", caller, &target, &decision, started);
        Ok(PermissionReport { decision, target })
    }

    /// Kills the target and reaps its memory, if the policy allows.
    pub async fn kill_and_reap(&self, caller: &Caller, request: KillRequest) -> Result<KillReport, EngineError> {
        let started = Instant::now();
        let wait = request.wait_for_exit.map(|w| w.min(MAX_WAIT_FOR_EXIT));
        let target = match self.pin(caller, request.target, request.pidns).await {
            Ok(target) => target,
            Err(err) => {
                audit_refusal("kill", caller, &err, started);
                return Err(err);
            }
        };
        let decision = self.decide(&self.policy.load(), caller, &target);
        audit_decision("kill", caller, &target, &decision, started);
        if !decision.allowed {
            return Err(EngineError::PermissionDenied(decision.reason));
        }
        let in_flight = match self.limiter.acquire(caller.uid, &self.limits.load()) {
            Ok(slot) => slot,
            Err(err) => {
                audit_refusal("kill", caller, &err, started);
                return Err(err);
            }
        };

        // Past this point the kill happens and is audited even if the client
        // hangs up: the work runs in its own task, which the transport's
        // request future (dropped on disconnect) only waits for.
        let path = self.features.kill_path();
        let audit_caller = CallerSummary::of(caller);
        let rule = decision.rule;
        let work = tokio::spawn(async move {
            let _in_flight = in_flight;
            let (target, reaped) = run_blocking(move || {
                let report = reaper::kill_and_reap(&target, path);
                Ok((target, report))
            })
            .await?;
            let reap = match reaped {
                Ok(report) => report,
                Err(err) => {
                    audit_outcome_error(&audit_caller, &target, &err, started);
                    return Err(err);
                }
            };
            let wait = wait.unwrap_or(Duration::ZERO);
            let (target, exited) = run_blocking(move || {
                let exited = target::wait_for_exit(std::os::fd::AsFd::as_fd(&target.pidfd), wait);
                Ok((target, exited))
            })
            .await?;
            let report = KillReport {
                target,
                rule,
                reap,
                exited,
            };
            audit_outcome(&audit_caller, &report, started);
            Ok(report)
        });
        work.await
            .unwrap_or_else(|join| Err(EngineError::Internal(format!("kill task failed: {join}"))))
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
