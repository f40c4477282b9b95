// SPDX-License-Identifier: MIT OR Apache-2.0
//! A warning for gRPC streams refused because of their `:authority`.
//!
//! Some gRPC clients send the Unix socket's path (`/run/reapd/grpc.sock`) or
//! another string that is not a valid URI authority as `:authority` (grpcio
//! without `grpc.default_authority`, grpcurl without `-authority`,
//! grpc-java, grpc-swift). The h2 crate under tonic resets such a stream
//! with PROTOCOL_ERROR while it decodes the headers
//! (`h2::server::convert_poll_message`), before any request reaches tonic or
//! our tower layers; the client sees a bare reset (grpcio: INTERNAL) and
//! h2's only trace is a `debug!` event of target `h2::server`. Nothing above
//! h2 can catch it, so this module listens for that event: [`layer`] is a
//! tracing layer, filtered to `h2::server` at debug level only, that turns
//! each "malformed authority" event into one `warn!` with the fix, at most
//! once per [`WARN_INTERVAL`] (a misconfigured client retrying in a loop
//! must not flood the journal), counting the refusals in between.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Filter, Layer};

/// At most one warning per interval; the next one says how many streams
/// were refused since the previous.
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// What h2 logs (at debug level, target `h2::server`) when it resets a
/// stream for its `:authority`.
const H2_MALFORMED_AUTHORITY: &str = "malformed headers: malformed authority";

/// The layer to add to the broker's subscriber, next to the output layer.
/// Its own filter enables only `h2::server` debug events for it, so the
/// output's filter (`REAPD_LOG`) is unchanged; the output layer must carry
/// its filter as a per-layer filter for this one to see those events.
pub fn layer<S>() -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    AuthorityWatch::default().with_filter(h2_server_debug())
}

fn h2_server_debug<S: Subscriber>() -> impl Filter<S> {
    Targets::new().with_target("h2::server", Level::DEBUG)
}

/// Rate-limit state: when the last warning was written, and how many
/// refusals have not been reported since.
#[derive(Default)]
struct AuthorityWatch {
    state: Mutex<WarnState>,
}

#[derive(Default)]
struct WarnState {
    last_warned: Option<Instant>,
    unreported: u64,
}

impl WarnState {
    /// Counts a refusal; returns how many to report now (this one
    /// included), or `None` while the interval since the last warning runs.
    fn refused(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        if self
            .last_warned
            .is_some_and(|last| now.duration_since(last) < WARN_INTERVAL)
        {
            return None;
        }
        self.last_warned = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

impl<S: Subscriber> Layer<S> for AuthorityWatch {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        let Some(detail) = message.0.strip_prefix(H2_MALFORMED_AUTHORITY) else {
            return;
        };
        let refused = {
            let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            state.refused(Instant::now())
        };
        if let Some(refused) = refused {
            tracing::warn!(
                refused,
                detail = detail.trim_start_matches([' ', ':']),
                "refused a gRPC stream: its :authority is not a valid URI authority (a socket path?); the \
                 client sees a stream reset (grpcio: INTERNAL). Have the client send \"localhost\": grpcio \
                 option grpc.default_authority=localhost, grpcurl -authority localhost. At most one such \
                 warning a minute; `refused` counts the streams since the last"
            );
        }
    }
}

/// Collects an event's `message` field (h2 formats its whole text there).
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_counting_the_refusals_between() {
        let mut state = WarnState::default();
        let t0 = Instant::now();
        assert_eq!(state.refused(t0), Some(1));
        assert_eq!(state.refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(state.refused(t0 + Duration::from_secs(59)), None);
        assert_eq!(state.refused(t0 + WARN_INTERVAL), Some(3));
        assert_eq!(state.refused(t0 + WARN_INTERVAL * 3), Some(1));
    }
}
