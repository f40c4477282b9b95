//! The engine's typed errors. Each transport maps them to its own wire form
//! (gRPC status codes, varlink error names); the mapping is the only place
//! they differ.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed (bad pid, bad fd, out-of-range value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such process.
    #[error("no such process: {0}")]
    NotFound(String),
    /// The policy (or the kernel) refuses this caller this target.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
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
