// SPDX-License-Identifier: MIT OR Apache-2.0
//! The gRPC transport (`reapd.v1.Reaper`, plus `grpc.health.v1` and server
//! reflection on the same socket). A thin adapter: decode, call the engine,
//! encode. No decision is made here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reapd_proto::v1 as pb;
use reapd_proto::v1::reaper_server::{Reaper, ReaperServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::engine::caller::Caller;
use crate::engine::candidates::{self, CandidatesReport, SortKey};
use crate::engine::error::EngineError;
use crate::engine::events::{KillEvent, KillKind, Subscription};
use crate::engine::group::{GroupReport, GroupSpec};
use crate::engine::policy::DecisionKind;
use crate::engine::reaper::Outcome;
use crate::engine::target::{ProcessInfo, TargetSpec};
use crate::engine::{Capabilities, Engine, GroupKillRequest, KillReport, KillRequest, PermissionReport};
use crate::os::features::KillPath;
use crate::os::procfs::Memory;
use crate::transport::listener::{self, AcceptConfig, ConnectionCounter, PeerInfo, PeerStream};

/// Largest request the broker decodes. Real requests are a few bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Largest reply the broker encodes. The largest are a group kill's (its
/// member list is bounded by `group::MAX_REPORTED_BYTES`) and a candidates
/// page (1,000 entries); both stay far below it and below the 4 MiB every
/// gRPC client accepts by default. A reply that did not fit would fail
/// after its kill was done, so the bound is on what replies list.
pub const MAX_REPLY_BYTES: usize = 4 << 20;

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info().clone()
    }
}

/// Marks the connection as having carried a request, which turns its
/// slow-loris timer off (see [`PeerStream`]). Runs for every service on the
/// socket (health checks and reflection included).
fn mark_served<B>(request: tonic::codegen::http::Request<B>) -> tonic::codegen::http::Request<B> {
    if let Some(info) = request.extensions().get::<PeerInfo>() {
        info.served.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    request
}

pub struct GrpcReaper {
    engine: Arc<Engine>,
}

fn caller_of<T>(request: &Request<T>) -> Result<Arc<Caller>, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|info| Arc::clone(&info.caller))
        .ok_or_else(|| Status::internal("connection has no caller identity"))
}

fn target_spec(target: Option<pb::Target>) -> Result<TargetSpec, Status> {
    // Decoding only: the engine validates the pid, for every transport.
    let target = target.ok_or_else(|| Status::invalid_argument("target is required"))?;
    Ok(TargetSpec::Pid {
        pid: target.pid,
        start_time: target.start_time,
    })
}

/// The `domain` of the broker's `google.rpc.ErrorInfo` details.
pub const ERROR_DOMAIN: &str = "reapd.v1";

pub fn status_of(err: EngineError) -> Status {
    let message = err.message();
    let code = match &err {
        EngineError::InvalidArgument(_) => tonic::Code::InvalidArgument,
        EngineError::NotFound(_) => tonic::Code::NotFound,
        EngineError::PermissionDenied { .. } => tonic::Code::PermissionDenied,
        EngineError::ProcessChanged(_) => tonic::Code::FailedPrecondition,
        EngineError::RateLimited { .. } => tonic::Code::ResourceExhausted,
        EngineError::Internal(_) => tonic::Code::Internal,
    };
    // The typed verdict rides in the standard rich error model: an
    // ErrorInfo whose reason is the decision kind (UPPER_SNAKE, as AIP-193
    // asks) and whose metadata names the kind and the deciding rule.
    let mut status = match err.decision() {
        Some((kind, rule)) => {
            use tonic_types::{ErrorDetails, StatusExt};
            let metadata = std::collections::HashMap::from([
                ("kind".to_string(), kind.as_str().to_string()),
                ("rule".to_string(), rule.to_string()),
            ]);
            let details = ErrorDetails::with_error_info(kind.as_str().to_uppercase(), ERROR_DOMAIN, metadata);
            Status::with_error_details(code, message, details)
        }
        None => Status::new(code, message),
    };
    if let EngineError::RateLimited { retry_after, .. } = &err {
        if let Ok(value) = retry_after.as_millis().to_string().parse() {
            status.metadata_mut().insert("retry-after-ms", value);
        }
    }
    status
}

fn process_info(process: ProcessInfo) -> pb::ProcessInfo {
    pb::ProcessInfo {
        pid: process.pid,
        uid: process.ruid,
        euid: process.euid,
        suid: process.suid,
        gid: process.gid,
        comm: process.comm,
        start_time: process.start_time,
        cgroup: process.cgroup,
    }
}

fn memory(memory: &Memory) -> pb::MemoryUsage {
    pb::MemoryUsage {
        anon_bytes: memory.anon_bytes,
        file_bytes: memory.file_bytes,
        shmem_bytes: memory.shmem_bytes,
        swap_bytes: memory.swap_bytes,
        hugetlb_bytes: memory.hugetlb_bytes,
    }
}

fn kill_path(path: KillPath) -> pb::KillPath {
    match path {
        KillPath::ReapKill => pb::KillPath::ReapKill,
        KillPath::KillThenMrelease => pb::KillPath::KillThenMrelease,
        KillPath::KillOnly => pb::KillPath::KillOnly,
    }
}

fn kill_reply(report: KillReport) -> pb::KillAndReapResponse {
    pb::KillAndReapResponse {
        outcome: outcome(report.reap.outcome) as i32,
        not_reaped_reason: report.reap.not_reaped_reason,
        kill_path: kill_path(report.reap.kill_path) as i32,
        target: Some(process_info(report.target.info())),
        memory_before: Some(memory(&report.reap.memory_before)),
        bytes_released: report.reap.bytes_released,
        kill_to_reap_ns: report.reap.kill_to_reap.as_nanos() as u64,
        exited: report.exited,
        rule: report.rule,
        reap_retries: report.reap.reap_retries,
    }
}

fn outcome(outcome: Outcome) -> pb::Outcome {
    match outcome {
        Outcome::Reaped => pb::Outcome::Reaped,
        Outcome::ExitedBeforeReap => pb::Outcome::ExitedBeforeReap,
        Outcome::KilledNotReaped => pb::Outcome::KilledNotReaped,
        Outcome::AlreadyDying => pb::Outcome::AlreadyDying,
    }
}

fn candidates_reply(report: CandidatesReport) -> pb::ListCandidatesResponse {
    pb::ListCandidatesResponse {
        processes: report
            .processes
            .iter()
            .map(|c| pb::Candidate {
                process: Some(process_info(c.target.info())),
                memory: Some(memory(&c.memory)),
                unique_bytes: c.unique_bytes(),
                oom_score: c.oom_score,
                oom_score_adj: c.target.oom_score_adj,
                rule: c.rule.clone(),
            })
            .collect(),
        cgroups: report
            .cgroups
            .iter()
            .map(|g| pb::CgroupCandidate {
                cgroup: g.path.clone(),
                processes: g.processes,
                memory: Some(memory(&g.memory)),
            })
            .collect(),
        total: report.total,
        next_offset: report.next_offset,
    }
}

fn group_reply(report: GroupReport) -> pb::KillCgroupResponse {
    pb::KillCgroupResponse {
        cgroup: report.cgroup,
        members: report
            .members
            .iter()
            .map(|m| pb::MemberReport {
                process: Some(process_info(m.target.info())),
                memory_before: Some(memory(&m.memory_before)),
                outcome: outcome(m.outcome) as i32,
                not_reaped_reason: m.not_reaped_reason.clone(),
            })
            .collect(),
        refused_newcomers: report
            .refused_newcomers
            .iter()
            .map(|t| process_info(t.info()))
            .collect(),
        bytes_released: report.bytes_released,
        kill_to_reap_ns: report.kill_to_reap.as_nanos() as u64,
        passes: report.passes,
        members_total: report.members_total as u32,
    }
}

fn kill_event(event: KillEvent) -> pb::KillEvent {
    pb::KillEvent {
        sequence: event.sequence,
        time_unix_ns: unix_ns(event.time),
        kind: match event.kind {
            KillKind::Process => pb::KillKind::Process,
            KillKind::Cgroup => pb::KillKind::Cgroup,
        } as i32,
        requester: Some(pb::Requester {
            pid: event.requester.pid,
            uid: event.requester.uid,
            comm: event.requester.comm,
        }),
        rule: event.rule,
        cgroup: event.cgroup,
        kill_path: kill_path(event.kill_path) as i32,
        victims: event
            .victims
            .into_iter()
            .map(|v| pb::Victim {
                process: Some(process_info(v.process)),
                memory_before: Some(memory(&v.memory_before)),
                outcome: outcome(v.outcome) as i32,
                not_reaped_reason: v.not_reaped_reason,
                seen_as: v.seen_as,
            })
            .collect(),
        complete: event.complete,
        bytes_released: event.bytes_released,
        kill_to_reap_ns: event.kill_to_reap.as_nanos() as u64,
        elapsed_ns: event.elapsed.as_nanos() as u64,
        dropped: event.dropped,
    }
}

/// Nanoseconds since the Unix epoch (0 before it).
fn unix_ns(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn permission_reply(report: PermissionReport) -> pb::CheckPermissionResponse {
    pb::CheckPermissionResponse {
        allowed: report.decision.allowed,
        reason: report.decision.reason,
        target: Some(process_info(report.target.info())),
        kind: decision_kind(report.decision.kind) as i32,
        rule: report.decision.rule,
    }
}

fn decision_kind(kind: DecisionKind) -> pb::DecisionKind {
    match kind {
        DecisionKind::Allowed => pb::DecisionKind::Allowed,
        DecisionKind::Protected => pb::DecisionKind::Protected,
        DecisionKind::NoRule => pb::DecisionKind::NoRule,
        DecisionKind::DeniedByRule => pb::DecisionKind::DeniedByRule,
        DecisionKind::Degraded => pb::DecisionKind::Degraded,
        DecisionKind::NotVisible => pb::DecisionKind::NotVisible,
        DecisionKind::RateLimited => pb::DecisionKind::RateLimited,
        DecisionKind::Unverified => pb::DecisionKind::Unverified,
    }
}

fn capabilities_reply(caps: Capabilities) -> pb::GetCapabilitiesResponse {
    pb::GetCapabilitiesResponse {
        broker_version: caps.broker_version.to_string(),
        kernel_release: caps.features.kernel_release,
        process_mrelease: caps.features.process_mrelease,
        reap_kill_flag: caps.features.reap_kill_flag,
        pidfd_get_info: caps.features.pidfd_get_info,
        so_peerpidfd: caps.features.so_peerpidfd,
        cgroup_kill: caps.features.cgroup_kill,
        kill_path: kill_path(caps.kill_path) as i32,
        has_cap_kill: caps.features.has_cap_kill,
        notes: caps.features.notes,
    }
}

/// A `WatchKills` response stream: the subscription's events, mapped.
pub type KillEventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::KillEvent, Status>> + Send>>;

fn event_stream(subscription: Subscription) -> KillEventStream {
    Box::pin(futures_util::stream::unfold(
        subscription,
        |mut subscription| async move {
            let event = subscription.next().await?;
            Some((Ok(kill_event(event)), subscription))
        },
    ))
}

#[tonic::async_trait]
impl Reaper for GrpcReaper {
    type WatchKillsStream = KillEventStream;

    async fn watch_kills(
        &self,
        request: Request<pb::WatchKillsRequest>,
    ) -> Result<Response<Self::WatchKillsStream>, Status> {
        let caller = caller_of(&request)?;
        let subscription = self.engine.watch_kills(&caller).map_err(status_of)?;
        Ok(Response::new(event_stream(subscription)))
    }

    async fn kill_and_reap(
        &self,
        request: Request<pb::KillAndReapRequest>,
    ) -> Result<Response<pb::KillAndReapResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let kill = KillRequest {
            target: target_spec(request.target)?,
            wait_for_exit: request.wait_for_exit_ms.map(|ms| Duration::from_millis(ms.into())),
            // gRPC passes no fds: a caller in a child pid namespace is
            // refused unless the broker can open its namespace itself.
            pidns: None,
            grace: request.grace_ms.map(|ms| Duration::from_millis(ms.into())),
            reap_delay: request.reap_delay_ms.map(|ms| Duration::from_millis(ms.into())),
        };
        let report = self.engine.kill_and_reap(&caller, kill).await.map_err(status_of)?;
        Ok(Response::new(kill_reply(report)))
    }

    async fn check_permission(
        &self,
        request: Request<pb::CheckPermissionRequest>,
    ) -> Result<Response<pb::CheckPermissionResponse>, Status> {
        let caller = caller_of(&request)?;
        let spec = target_spec(request.into_inner().target)?;
        let report = self.engine.check_permission(&caller, spec).await.map_err(status_of)?;
        Ok(Response::new(permission_reply(report)))
    }

    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities_reply(self.engine.capabilities())))
    }

    async fn list_candidates(
        &self,
        request: Request<pb::ListCandidatesRequest>,
    ) -> Result<Response<pb::ListCandidatesResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let key = match pb::SortKey::try_from(request.sort_by) {
            Ok(pb::SortKey::Unspecified | pb::SortKey::Unique) => SortKey::Unique,
            Ok(pb::SortKey::Anon) => SortKey::Anon,
            Ok(pb::SortKey::Rss) => SortKey::Rss,
            Ok(pb::SortKey::Swap) => SortKey::Swap,
            Ok(pb::SortKey::OomScore) => SortKey::OomScore,
            Ok(pb::SortKey::StartTime) => SortKey::StartTime,
            Err(_) => return Err(Status::invalid_argument("sort_by: unknown sort key")),
        };
        let query = candidates::Query {
            key,
            offset: request.offset as usize,
            limit: request.limit as usize,
        };
        let report = self.engine.candidates(&caller, query, None).await.map_err(status_of)?;
        Ok(Response::new(candidates_reply(report)))
    }

    async fn kill_cgroup(
        &self,
        request: Request<pb::KillCgroupRequest>,
    ) -> Result<Response<pb::KillCgroupResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let group = match request.group {
            Some(pb::kill_cgroup_request::Group::Cgroup(path)) => GroupSpec::Path(path),
            Some(pb::kill_cgroup_request::Group::Unit(unit)) => GroupSpec::Unit(unit),
            None => return Err(Status::invalid_argument("group: give a cgroup or a unit")),
        };
        let kill = GroupKillRequest {
            group,
            pidns: None,
            reap_delay: request.reap_delay_ms.map(|ms| Duration::from_millis(ms.into())),
        };
        let report = self.engine.kill_cgroup(&caller, kill).await.map_err(status_of)?;
        Ok(Response::new(group_reply(report)))
    }
}

/// Serves gRPC on `listener` until `shutdown` completes, then finishes the
/// calls in flight and returns.
pub async fn serve(
    listener: tokio::net::UnixListener,
    engine: Arc<Engine>,
    config: AcceptConfig,
    counter: Arc<ConnectionCounter>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ReaperServer<GrpcReaper>>().await;
    // Reflection in both versions: v1, and v1alpha for the clients that
    // still speak only that (older grpcurl, grpcio-reflection's Python
    // descriptor database). Same descriptors, same answers.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let features = Arc::clone(engine.features());
    let reaper = ReaperServer::new(GrpcReaper { engine })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_REPLY_BYTES);

    let (sender, receiver) = mpsc::channel::<Result<PeerStream, std::io::Error>>(64);
    let idle = config.limits.idle_timeout;
    let acceptor = tokio::spawn(listener::accept_loop(
        listener,
        features,
        config,
        counter,
        move |accepted| {
            match sender.try_send(Ok(PeerStream::new(accepted, idle))) {
                Ok(()) => true,
                // Backlog full: drop this connection rather than stall accept.
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        },
    ));
    // Shutdown stops the acceptor, not the server: connections already
    // accepted (queued in the channel, or still being identified) are then
    // drained, the channel closes, and tonic sends GOAWAY on every
    // connection, finishes the calls in flight and waits for the clients to
    // close. A client that never does (a blocking client whose runtime is
    // not running between calls) is bounded by the caller: main stops
    // waiting after its grace period. A kill in flight is not lost either
    // way: it runs in its own task, which main waits for.
    // Under socket activation nothing is lost: connections not yet accepted
    // stay in the socket, which systemd keeps.
    tokio::spawn(async move {
        shutdown.await;
        acceptor.abort();
    });

    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(16))
        .concurrency_limit_per_connection(16)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(30))
        .layer(tower::util::MapRequestLayer::new(mark_served))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(reaper)
        .serve_with_incoming_shutdown(ReceiverStream::new(receiver), std::future::pending::<()>())
        .await
}
