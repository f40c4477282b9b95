// SPDX-License-Identifier: MIT OR Apache-2.0
//! What an OOM manager needs beyond single kills: whole-cgroup kills, the
//! list of victims it may kill, and a paced kill (SIGTERM grace, reap
//! delay). Available on the async and blocking gRPC clients and on the
//! varlink client, with the same types.

use std::time::Duration;

#[cfg(feature = "grpc")]
use reapd_proto::v1 as pb;
#[cfg(feature = "varlink")]
use serde_json::{json, Map, Value};

#[cfg(feature = "grpc")]
use crate::{is_transport_failure, within, Error, KillReport, Target};

/// How a kill is paced; the default is SIGKILL and reap at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KillOptions {
    /// Wait up to this long after the reap for the process to be gone
    /// (capped at 10 s by the broker).
    pub wait_for_exit: Option<Duration>,
    /// SIGTERM first; SIGKILL + reap only if still alive after this long
    /// (capped at 10 s).
    pub grace: Option<Duration>,
    /// After SIGKILL let the process run its exit path this long (robust
    /// futexes reach their waiters) and reap only if it is still there;
    /// `None`: the policy's `reap-delay-ms`.
    pub reap_delay: Option<Duration>,
}

/// A cgroup to kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    /// An absolute cgroup v2 path as the broker sees it.
    Cgroup(String),
    /// A systemd unit, found only where root names cgroups.
    Unit(String),
}

pub use reapd_proto::model::{Candidate, Candidates, CgroupCandidate, GroupReport, MemberReport, SortKey};

/// Which page of which ranking.
#[derive(Debug, Clone, Copy, Default)]
pub struct CandidatesQuery {
    /// The ranking.
    pub sort_by: SortKey,
    /// Entries per page, 1..=1000; 0 means 100.
    pub limit: u32,
    /// Entries to skip: 0, or the previous page's `next_offset`.
    pub offset: u32,
}

/// Milliseconds for the wire, saturating at `u32::MAX`.
fn ms(d: Option<Duration>) -> Option<u32> {
    d.map(|d| d.as_millis().min(u32::MAX as u128) as u32)
}

#[cfg(feature = "grpc")]
impl crate::Client {
    /// Kills `target` paced by `options`; otherwise as
    /// [`crate::Client::kill_and_reap`] (one transparent retry after a lost
    /// connection, pinned to the start time read before the first try).
    /// Bounded by the client's timeout plus the waits `options` ask for (see
    /// the crate docs, "Timeouts").
    pub async fn kill_and_reap_with(&mut self, target: Target, options: KillOptions) -> Result<KillReport, Error> {
        let limit = crate::kill_timeout(self.timeout, &options);
        within(limit, self.kill_and_reap_unbounded(target, options)).await
    }

    async fn kill_and_reap_unbounded(&mut self, target: Target, options: KillOptions) -> Result<KillReport, Error> {
        let request = |target: Target| pb::KillAndReapRequest {
            target: Some(target.into()),
            wait_for_exit_ms: ms(options.wait_for_exit),
            grace_ms: ms(options.grace),
            reap_delay_ms: ms(options.reap_delay),
        };
        let retry_target = match target.start_time {
            Some(_) => Some(target.clone()),
            None => Target::pinned(target.pid).ok(),
        };
        let reply = match self.inner.kill_and_reap(request(target)).await {
            Ok(reply) => reply,
            Err(status) if is_transport_failure(&status) => match retry_target {
                Some(pinned) => {
                    self.reconnect().await?;
                    self.inner.kill_and_reap(request(pinned)).await?
                }
                None => return Err(status.into()),
            },
            Err(status) => return Err(status.into()),
        }
        .into_inner();
        Ok(reply.into())
    }

    /// Kills every process of `group` and reaps them, all or nothing
    /// (PERMISSION_DENIED names the member that may not be killed).
    /// `reap_delay`: as in [`KillOptions`]. Not retried after a lost
    /// connection: the caller re-lists and decides again. Bounded by the
    /// client's timeout plus the reap delay (see the crate docs).
    pub async fn kill_cgroup(&mut self, group: Group, reap_delay: Option<Duration>) -> Result<GroupReport, Error> {
        let options = KillOptions {
            reap_delay,
            ..KillOptions::default()
        };
        let limit = crate::kill_timeout(self.timeout, &options);
        within(limit, self.kill_cgroup_unbounded(group, reap_delay)).await
    }

    async fn kill_cgroup_unbounded(
        &mut self,
        group: Group,
        reap_delay: Option<Duration>,
    ) -> Result<GroupReport, Error> {
        let request = pb::KillCgroupRequest {
            group: Some(match group {
                Group::Cgroup(path) => pb::kill_cgroup_request::Group::Cgroup(path),
                Group::Unit(unit) => pb::kill_cgroup_request::Group::Unit(unit),
            }),
            reap_delay_ms: ms(reap_delay),
        };
        Ok(self.inner.kill_cgroup(request).await?.into_inner().into())
    }

    /// The processes and cgroups the caller may kill now, one page.
    /// Errors: [`Error::InvalidArgument`] (a limit above 1000),
    /// [`Error::Timeout`], [`Error::Transport`].
    pub async fn list_candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, Error> {
        within(self.timeout, self.list_candidates_unbounded(query)).await
    }

    async fn list_candidates_unbounded(&mut self, query: CandidatesQuery) -> Result<Candidates, Error> {
        let request = pb::ListCandidatesRequest {
            sort_by: query.sort_by.into(),
            limit: query.limit,
            offset: query.offset,
        };
        let reply = match self.inner.list_candidates(request).await {
            Err(status) if is_transport_failure(&status) => {
                self.reconnect().await?;
                self.inner.list_candidates(request).await?
            }
            other => other?,
        }
        .into_inner();
        Ok(reply.into())
    }
}

#[cfg(feature = "grpc")]
impl crate::blocking::Client {
    /// As [`crate::Client::kill_and_reap_with`].
    pub fn kill_and_reap_with(&mut self, target: Target, options: KillOptions) -> Result<KillReport, Error> {
        let (runtime, inner) = self.parts();
        runtime.block_on(inner.kill_and_reap_with(target, options))
    }

    /// As [`crate::Client::kill_cgroup`].
    pub fn kill_cgroup(&mut self, group: Group, reap_delay: Option<Duration>) -> Result<GroupReport, Error> {
        let (runtime, inner) = self.parts();
        runtime.block_on(inner.kill_cgroup(group, reap_delay))
    }

    /// As [`crate::Client::list_candidates`].
    pub fn list_candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, Error> {
        let (runtime, inner) = self.parts();
        runtime.block_on(inner.list_candidates(query))
    }
}

// ---- varlink ----

#[cfg(feature = "varlink")]
impl crate::varlink::Client {
    /// As [`crate::Client::kill_cgroup`], over varlink.
    pub fn kill_cgroup(
        &mut self,
        group: Group,
        reap_delay: Option<Duration>,
    ) -> Result<GroupReport, crate::varlink::Error> {
        let mut params = Map::new();
        match group {
            Group::Cgroup(path) => params.insert("cgroup".into(), json!(path)),
            Group::Unit(unit) => params.insert("unit".into(), json!(unit)),
        };
        if let Some(ms) = ms(reap_delay) {
            params.insert("reapDelayMs".into(), json!(ms));
        }
        let options = KillOptions {
            reap_delay,
            ..KillOptions::default()
        };
        let limit = crate::kill_timeout(self.timeout(), &options);
        let reply = self.call_within(limit, "io.reapd.Reaper.KillCgroup", Value::Object(params), &[])?;
        crate::varlink::decode(reply)
    }

    /// As [`crate::Client::list_candidates`], over varlink.
    pub fn list_candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, crate::varlink::Error> {
        let params = json!({
            "sortBy": query.sort_by.as_str(),
            "limit": query.limit,
            "offset": query.offset,
        });
        let reply = self.call("io.reapd.Reaper.ListCandidates", params, &[])?;
        crate::varlink::decode(reply)
    }
}
