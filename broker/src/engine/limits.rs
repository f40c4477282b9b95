// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-caller-uid limits on kills: a token bucket (kills per interval with a
//! burst) and a cap on kills in flight; and one broker-wide cap on kills in
//! flight. Checks have no side effect and are not limited here; connection
//! limits live in the listener.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::error::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct KillLimits {
    /// Tokens added per second.
    pub kills_per_second: f64,
    /// Bucket size: kills allowed in a burst.
    pub burst: u32,
    /// Kills one uid may have in flight at once.
    pub max_in_flight: u32,
}

impl Default for KillLimits {
    fn default() -> Self {
        // An OOM killer kills a handful of processes a second at most; a
        // burst of 64 covers killing a whole session at once.
        KillLimits {
            kills_per_second: 20.0,
            burst: 64,
            max_in_flight: 16,
        }
    }
}

/// Kills in flight broker-wide, whatever their callers. Each holds its slot
/// until its caller is answered: its grace, reap delay and wait for exit
/// (up to ~10 s each, in place on the blocking pool's 64 threads,
/// `server.rs`) and at most `reap_pool::REAP_ANSWER_AFTER` of its reap (a
/// reap that outlasts it goes on on its reaper thread, holding no slot).
/// The rest of the pool must stay free for the async workers' hand-off when
/// a kill blocks in place and for caller identification at accept, so that
/// kills of victims that will not die never stall other callers. Beyond it
/// a kill is refused as rate-limited (and audited as such).
pub const MAX_KILLS_IN_FLIGHT: u32 = 48;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    in_flight: u32,
}

#[derive(Debug, Default)]
pub struct Limiter {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<u32, Bucket>,
    /// Kills in flight, all uids.
    in_flight: u32,
}

/// Holds one in-flight slot; released on drop.
#[must_use]
pub struct InFlight {
    limiter: Arc<Limiter>,
    uid: u32,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(bucket) = state.buckets.get_mut(&self.uid) {
            bucket.in_flight = bucket.in_flight.saturating_sub(1);
        }
    }
}

impl Limiter {
    /// Takes one kill token and one in-flight slot for `uid`, or says when
    /// to retry. A kill refused for the broker-wide cap
    /// ([`MAX_KILLS_IN_FLIGHT`]) spends no token.
    pub fn acquire(self: &Arc<Self>, uid: u32, limits: &KillLimits) -> Result<InFlight, EngineError> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.in_flight >= MAX_KILLS_IN_FLIGHT {
            return Err(EngineError::RateLimited {
                reason: format!(
                    "the broker has {} kills in flight, all callers together (limit {MAX_KILLS_IN_FLIGHT})",
                    state.in_flight
                ),
                retry_after: Duration::from_millis(10),
            });
        }
        let State { buckets, in_flight } = &mut *state;
        let bucket = buckets.entry(uid).or_insert(Bucket {
            tokens: limits.burst as f64,
            refilled: now,
            in_flight: 0,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limits.kills_per_second).min(limits.burst as f64);
        bucket.refilled = now;
        if bucket.in_flight >= limits.max_in_flight {
            return Err(EngineError::RateLimited {
                reason: format!(
                    "uid {uid} has {} kills in flight (limit {})",
                    bucket.in_flight, limits.max_in_flight
                ),
                retry_after: Duration::from_millis(10),
            });
        }
        if bucket.tokens < 1.0 {
            let wait = if limits.kills_per_second > 0.0 {
                Duration::from_secs_f64((1.0 - bucket.tokens) / limits.kills_per_second)
            } else {
                Duration::from_secs(3600)
            };
            return Err(EngineError::RateLimited {
                reason: format!(
                    "uid {uid} is over its kill rate ({} per second, burst {})",
                    limits.kills_per_second, limits.burst
                ),
                retry_after: wait.max(Duration::from_millis(1)),
            });
        }
        bucket.tokens -= 1.0;
        bucket.in_flight += 1;
        *in_flight += 1;
        Ok(InFlight {
            limiter: Arc::clone(self),
            uid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_with_hint() {
        let limiter = Arc::new(Limiter::default());
        let limits = KillLimits {
            kills_per_second: 1.0,
            burst: 3,
            max_in_flight: 100,
        };
        let held: Vec<_> = (0..3).map(|_| limiter.acquire(7, &limits).unwrap()).collect();
        match limiter.acquire(7, &limits) {
            // One kill per second and the burst just spent: the next token is
            // due in (almost exactly) one second, which is the hint.
            Err(EngineError::RateLimited { retry_after, .. }) => assert!(
                (Duration::from_millis(900)..=Duration::from_secs(1)).contains(&retry_after),
                "{retry_after:?}"
            ),
            other => panic!("expected RateLimited, got {:?}", other.map(|_| ())),
        }
        // Other uids are not affected.
        assert!(limiter.acquire(8, &limits).is_ok());
        drop(held);
    }

    #[test]
    fn in_flight_slots_are_released() {
        let limiter = Arc::new(Limiter::default());
        let limits = KillLimits {
            kills_per_second: 1000.0,
            burst: 1000,
            max_in_flight: 1,
        };
        let first = limiter.acquire(1, &limits).unwrap();
        assert!(limiter.acquire(1, &limits).is_err());
        drop(first);
        assert!(limiter.acquire(1, &limits).is_ok());
    }

    /// The broker-wide cap holds across uids, and each released kill
    /// gives its slot back.
    #[test]
    fn kills_in_flight_are_capped_broker_wide() {
        let limiter = Arc::new(Limiter::default());
        let limits = KillLimits {
            kills_per_second: 1000.0,
            burst: 1000,
            max_in_flight: 1,
        };
        let mut held: Vec<_> = (0..MAX_KILLS_IN_FLIGHT)
            .map(|uid| limiter.acquire(uid, &limits).unwrap())
            .collect();
        match limiter.acquire(10_000, &limits) {
            Err(EngineError::RateLimited { reason, .. }) => assert!(reason.contains("all callers"), "{reason}"),
            other => panic!("expected RateLimited, got {:?}", other.map(|_| ())),
        }
        held.pop();
        assert!(limiter.acquire(10_000, &limits).is_ok());
    }
}
