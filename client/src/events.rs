// SPDX-License-Identifier: MIT OR Apache-2.0
//! Kill events (`WatchKills`): one per later kill of a process the caller is
//! entitled to see (root, the victim's owner, or a `watch` grant in the
//! broker's policy). Available on the async and blocking gRPC clients and on
//! the varlink client, with the same types.
//!
//! A subscription is one long-lived stream; it ends when the broker shuts
//! down (then `next` returns `None`). It is never re-established behind the
//! caller's back: kills made while no subscription existed are not replayed,
//! so a watcher that resubscribes should know it may have missed some
//! (`sequence` has gaps).

#[cfg(feature = "grpc")]
use crate::Error;
#[cfg(feature = "grpc")]
use reapd_proto::v1 as pb;

/// The events' types: the API's one data model, shared with the broker.
pub use reapd_proto::model::{KillEvent, Requester, Victim};

/// A gRPC kill-event subscription ([`crate::Client::watch_kills`]).
#[cfg(feature = "grpc")]
pub struct KillEvents {
    stream: tonic::Streaming<pb::KillEvent>,
}

#[cfg(feature = "grpc")]
impl KillEvents {
    /// The next event; `Ok(None)` when the broker ended the stream (it is
    /// shutting down).
    pub async fn next(&mut self) -> Result<Option<KillEvent>, Error> {
        Ok(self.stream.message().await?.map(Into::into))
    }
}

#[cfg(feature = "grpc")]
impl crate::Client {
    /// Subscribes to kill events. Returns once the subscription exists: every
    /// kill that completes after this returns and that the caller may see
    /// is delivered. Errors: [`Error::RateLimited`] beyond 4 subscriptions
    /// per uid, [`Error::Timeout`] if the subscription is not made within
    /// the client's timeout (events themselves may be any time apart). Not
    /// retried after a lost connection (see the module docs).
    pub async fn watch_kills(&mut self) -> Result<KillEvents, Error> {
        let subscribe = async {
            let stream = self.inner.watch_kills(pb::WatchKillsRequest {}).await?.into_inner();
            Ok(KillEvents { stream })
        };
        crate::within(self.timeout, subscribe).await
    }
}

/// A blocking gRPC kill-event subscription
/// ([`crate::blocking::Client::watch_kills`]); it borrows the client's
/// runtime.
#[cfg(feature = "grpc")]
pub struct BlockingKillEvents<'a> {
    runtime: &'a tokio::runtime::Runtime,
    events: KillEvents,
}

/// Yields each event as it comes (blocking) and ends when the broker ends
/// the stream (it is shutting down).
#[cfg(feature = "grpc")]
impl Iterator for BlockingKillEvents<'_> {
    type Item = Result<KillEvent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.runtime.block_on(self.events.next()).transpose()
    }
}

#[cfg(feature = "grpc")]
impl crate::blocking::Client {
    /// As [`crate::Client::watch_kills`].
    pub fn watch_kills(&mut self) -> Result<BlockingKillEvents<'_>, Error> {
        let (runtime, inner) = self.parts();
        let events = runtime.block_on(inner.watch_kills())?;
        Ok(BlockingKillEvents { runtime, events })
    }
}
