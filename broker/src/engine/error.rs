// SPDX-License-Identifier: MIT OR Apache-2.0
//! The engine's typed errors. Each transport maps them to its own wire form
//! (gRPC status codes, varlink error names); the mapping is the only place
//! they differ.

use std::time::Duration;

use crate::engine::policy::{Decision, DecisionKind};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed (bad pid, bad fd, out-of-range value);
    /// `parameter` is the API parameter to blame, as the varlink IDL names
    /// it (`pid`, `pidfd`, `pidns`, `cgroup`, `unit`, ...).
    #[error("invalid argument {parameter}: {message}")]
    InvalidArgument { parameter: &'static str, message: String },
    /// No such process.
    #[error("no such process: {0}")]
    NotFound(String),
    /// The policy (or the kernel) refuses this caller this target: the
    /// verdict's kind and the rule or protection that decided, for clients
    /// to branch on, and a sentence for people.
    #[error("permission denied: {reason}")]
    PermissionDenied {
        kind: DecisionKind,
        rule: String,
        reason: String,
    },
    /// The pid no longer names the process the caller meant.
    #[error("process changed: {0}")]
    ProcessChanged(String),
    /// The caller is over a rate or in-flight limit.
    #[error("rate limited: {reason}; retry after {} ms", retry_after.as_millis())]
    RateLimited { reason: String, retry_after: Duration },
    /// A broker bug or an unexpected kernel answer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// A malformed request, blaming `parameter`.
    pub fn invalid(parameter: &'static str, message: impl Into<String>) -> Self {
        EngineError::InvalidArgument {
            parameter,
            message: message.into(),
        }
    }

    /// Re-blames an `InvalidArgument` about parameter `from` on `to`.
    pub fn blaming(self, from: &str, to: &'static str) -> Self {
        match self {
            EngineError::InvalidArgument { parameter, message } if parameter == from => {
                EngineError::InvalidArgument { parameter: to, message }
            }
            other => other,
        }
    }

    /// The refusal a decision makes.
    pub fn refused(decision: &Decision) -> Self {
        EngineError::PermissionDenied {
            kind: decision.kind,
            rule: decision.rule.clone(),
            reason: decision.reason.clone(),
        }
    }

    /// A refusal because a fact could not be verified; `rule` names it
    /// (`unverified:...`).
    pub fn unverified(rule: &str, reason: impl Into<String>) -> Self {
        EngineError::PermissionDenied {
            kind: DecisionKind::Unverified,
            rule: rule.into(),
            reason: reason.into(),
        }
    }

    /// The message for the wire: the error's own sentence, without the
    /// prefix `Display` adds (the status code or varlink error name already
    /// says what kind of error it is, and clients add their own prefix).
    pub fn message(&self) -> String {
        match self {
            EngineError::InvalidArgument { message: m, .. }
            | EngineError::NotFound(m)
            | EngineError::ProcessChanged(m)
            | EngineError::Internal(m) => m.clone(),
            EngineError::PermissionDenied { reason, .. } => reason.clone(),
            EngineError::RateLimited { reason, retry_after } => {
                format!("{reason}; retry after {} ms", retry_after.as_millis())
            }
        }
    }

    /// The verdict's kind, for the refusals that have one: PERMISSION_DENIED
    /// carries its own, NOT_FOUND is always `not_visible` (a process the
    /// caller cannot see and one that does not exist look the same), and
    /// RESOURCE_EXHAUSTED `rate_limited`.
    pub fn decision(&self) -> Option<(DecisionKind, &str)> {
        match self {
            EngineError::PermissionDenied { kind, rule, .. } => Some((*kind, rule.as_str())),
            EngineError::NotFound(_) => Some((DecisionKind::NotVisible, "")),
            EngineError::RateLimited { .. } => Some((DecisionKind::RateLimited, "rate-limit")),
            _ => None,
        }
    }
}

/// The one mapping of engine errors to the API's: each transport encodes
/// the result (`ApiError::to_status`, `varlink_name`/`varlink_parameters`).
impl From<&EngineError> for reapd_proto::model::ApiError {
    fn from(err: &EngineError) -> Self {
        use reapd_proto::model::{ApiError, ErrorKind};
        let kind = match err {
            EngineError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            EngineError::ProcessChanged(_) => ErrorKind::ProcessChanged,
            EngineError::RateLimited { .. } => ErrorKind::RateLimited,
            EngineError::Internal(_) => ErrorKind::Internal,
        };
        let decision = err.decision();
        ApiError {
            kind,
            message: err.message(),
            decision: decision.map(|(kind, _)| kind),
            rule: decision.map(|(_, rule)| rule.to_string()).unwrap_or_default(),
            retry_after: match err {
                EngineError::RateLimited { retry_after, .. } => Some(*retry_after),
                _ => None,
            },
            parameter: match err {
                EngineError::InvalidArgument { parameter, .. } => Some(parameter.to_string()),
                _ => None,
            },
        }
    }
}
