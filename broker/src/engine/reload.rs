// SPDX-License-Identifier: MIT OR Apache-2.0
//! Loading the policy at start, `reapd check-policy`, and reloading it on
//! SIGHUP.
//!
//! A reload reads and validates the whole file first; only a policy that
//! compiled completely replaces the old one, in one atomic swap (see
//! `Engine::replace_policy`). An invalid file leaves the old policy in force
//! and the log says why.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::engine::limits::KillLimits;
use crate::engine::policy::{self, LoadError, Policy};
use crate::engine::Engine;

/// Where the daemon looks when `--policy` is not given.
pub const DEFAULT_POLICY_PATH: &str = "/etc/reapd/policy.toml";

/// Which file the daemon uses, and whether its absence is an error.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub path: PathBuf,
    /// `--policy` was given: the file must exist. The default path may be
    /// absent, which means the built-in default policy.
    pub explicit: bool,
}

impl PolicySource {
    pub fn new(flag: Option<PathBuf>) -> Self {
        match flag {
            Some(path) => PolicySource { path, explicit: true },
            None => PolicySource {
                path: PathBuf::from(DEFAULT_POLICY_PATH),
                explicit: false,
            },
        }
    }

    /// Loads the policy: the file's, or the built-in default when the
    /// default path does not exist.
    pub fn load(&self) -> Result<(Policy, KillLimits, &'static str), LoadError> {
        match policy::load_file(&self.path) {
            Ok((policy, limits)) => Ok((policy, limits, "file")),
            Err(LoadError::Io { source, .. }) if !self.explicit && source.kind() == std::io::ErrorKind::NotFound => {
                Ok((Policy::default(), KillLimits::default(), "built-in default"))
            }
            Err(err) => Err(err),
        }
    }
}

/// `reapd check-policy FILE`: prints `file:line:col: message` for each
/// problem on stderr and fails, or prints a summary and succeeds.
pub fn check_policy_command(path: &Path) -> ExitCode {
    match policy::load_file(path) {
        Ok((policy, limits)) => {
            println!(
                "{}: ok: {} rules, kill(2) rule {}, {} protections, {} kills/s burst {} in flight {}",
                path.display(),
                policy.rules().len(),
                if policy.kill_rule { "on" } else { "off" },
                policy.protected.len(),
                limits.kills_per_second,
                limits.burst,
                limits.max_in_flight
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the SIGHUP handler now (so a SIGHUP from here on reloads
/// instead of killing the daemon) and spawns the reload loop on `runtime`.
pub fn spawn_reloader(runtime: &tokio::runtime::Runtime, engine: Arc<Engine>, source: PolicySource) {
    use tokio::signal::unix::{signal, SignalKind};
    let _context = runtime.enter();
    match signal(SignalKind::hangup()) {
        Ok(hup) => {
            tracing::info!(path = %source.path.display(), "SIGHUP reloads the policy");
            runtime.spawn(reload_on_sighup(hup, engine, source));
        }
        Err(err) => tracing::error!(error = %err, "cannot install the SIGHUP handler; policy reload is off"),
    }
}

/// Reloads the policy on every SIGHUP until the runtime shuts down. Signals
/// that arrive while a reload runs are coalesced into one more reload, which
/// then reads the file as it is by then.
async fn reload_on_sighup(mut hup: tokio::signal::unix::Signal, engine: Arc<Engine>, source: PolicySource) {
    while hup.recv().await.is_some() {
        let source = source.clone();
        let loaded = tokio::task::spawn_blocking(move || source.load()).await;
        match loaded {
            Ok(Ok((policy, limits, origin))) => {
                let rules = policy.rules().len();
                let first_rule = policy.rules().first().map(|r| r.name.clone()).unwrap_or_default();
                engine.replace_policy(policy, limits);
                tracing::info!(origin, rules, first_rule = %first_rule, "policy reloaded");
            }
            Ok(Err(err)) => {
                let error = err.to_string().replace('\n', "; ");
                tracing::warn!(error = %error, "policy reload refused; the old policy stays in force");
            }
            Err(join) => tracing::error!(error = %join, "policy reload failed; the old policy stays in force"),
        }
    }
}
