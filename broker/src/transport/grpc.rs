// SPDX-License-Identifier: MIT OR Apache-2.0
//! The gRPC transport (`reapd.v1.Reaper`, plus `grpc.health.v1` and server
//! reflection on the same socket). A thin adapter: decode, call the engine,
//! encode. No decision is made here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reapd_proto::model::{self, ApiError};
use reapd_proto::v1 as pb;
use reapd_proto::v1::reaper_server::{Reaper, ReaperServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::engine::caller::Caller;
use crate::engine::candidates;
use crate::engine::error::EngineError;
use crate::engine::events::Subscription;
use crate::engine::group::GroupSpec;
use crate::engine::target::TargetSpec;
use crate::engine::{Engine, GroupKillRequest, KillRequest};
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
    // Blamed as varlink blames it (a `BadRequest` field violation the
    // client reads), not a bare status.
    let target = target.ok_or_else(|| status_of(EngineError::invalid("pid", "target is required")))?;
    Ok(TargetSpec::Pid {
        pid: target.pid,
        start_time: target.start_time,
    })
}

/// The one encoding of engine errors for gRPC: the API's error model
/// (`reapd_proto::model::ApiError`) as a status.
pub fn status_of(err: EngineError) -> Status {
    ApiError::from(&err).to_status()
}

/// A `WatchKills` response stream: the subscription's events, mapped.
pub type KillEventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::KillEvent, Status>> + Send>>;

fn event_stream(subscription: Subscription) -> KillEventStream {
    Box::pin(futures_util::stream::unfold(
        subscription,
        |mut subscription| async move {
            let event = subscription.next().await?;
            Some((Ok(model::KillEvent::from(event).into()), subscription))
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
        Ok(Response::new(model::KillReport::from(report).into()))
    }

    async fn check_permission(
        &self,
        request: Request<pb::CheckPermissionRequest>,
    ) -> Result<Response<pb::CheckPermissionResponse>, Status> {
        let caller = caller_of(&request)?;
        let spec = target_spec(request.into_inner().target)?;
        let report = self.engine.check_permission(&caller, spec).await.map_err(status_of)?;
        Ok(Response::new(model::Permission::from(report).into()))
    }

    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        Ok(Response::new(
            model::Capabilities::from(self.engine.capabilities()).into(),
        ))
    }

    async fn list_candidates(
        &self,
        request: Request<pb::ListCandidatesRequest>,
    ) -> Result<Response<pb::ListCandidatesResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        // A number this build does not know is the client's mistake, not
        // the default order.
        let key = match pb::SortKey::try_from(request.sort_by) {
            Ok(_) => model::SortKey::from(request.sort_by),
            Err(_) => return Err(status_of(EngineError::invalid("sortBy", "unknown sort key"))),
        };
        // The page size is checked by the engine (at most MAX_PAGE).
        let query = candidates::Query {
            key,
            offset: request.offset as usize,
            limit: request.limit as usize,
        };
        let report = self.engine.candidates(&caller, query, None).await.map_err(status_of)?;
        Ok(Response::new(model::Candidates::from(report).into()))
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
            None => return Err(status_of(EngineError::invalid("cgroup", "give a cgroup or a unit"))),
        };
        let kill = GroupKillRequest {
            group,
            pidns: None,
            reap_delay: request.reap_delay_ms.map(|ms| Duration::from_millis(ms.into())),
        };
        let report = self.engine.kill_cgroup(&caller, kill).await.map_err(status_of)?;
        Ok(Response::new(model::GroupReport::from(report).into()))
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
                // The server is behind (a burst of connections): wait for
                // room instead of closing a connection already accepted and
                // counted. The waiters are bounded by the connection caps,
                // which this connection already counts against; accept
                // itself never stalls.
                Err(mpsc::error::TrySendError::Full(stream)) => {
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        let _ = sender.send(stream).await;
                    });
                    true
                }
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
    // way: it runs to its end whatever happens to its request, and main waits
    // for it.
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
