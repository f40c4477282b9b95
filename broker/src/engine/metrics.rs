// SPDX-License-Identifier: MIT OR Apache-2.0
//! The broker's counters and latency histograms, for operators: kills by
//! outcome and path, bytes released, refusals by kind, connections, audit
//! records not written, events dropped. Served over varlink as
//! `io.systemd.Metrics` (`List`, `Describe`; systemd's shape, see
//! docs/metrics.md) and printed by `reapctl stats` (text, JSON, Prometheus).
//!
//! One process-wide set of relaxed atomics: recording is a few uncontended
//! atomic adds and never takes a lock on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::engine::policy::DecisionKind;
use crate::engine::reaper::Outcome;
use crate::os::features::KillPath;

/// Upper bounds of the latency histogram buckets, in seconds (Prometheus'
/// `le`); a last, implicit bucket is `+Inf`.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram: cumulative counts are derived when read.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

const OUTCOMES: [&str; 6] = [
    "reaped",
    "exited_before_reap",
    "killed_not_reaped",
    "already_dying",
    "failed",
    "reap_pending",
];
const PATHS: [&str; 3] = ["reap_kill", "kill_then_mrelease", "kill_only"];
const KINDS: [DecisionKind; 7] = [
    DecisionKind::Protected,
    DecisionKind::NoRule,
    DecisionKind::DeniedByRule,
    DecisionKind::Degraded,
    DecisionKind::NotVisible,
    DecisionKind::RateLimited,
    DecisionKind::Unverified,
];

/// Every counter the broker keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Processes killed, by outcome × kill path (a group kill counts each
    /// member).
    kills: [[AtomicU64; PATHS.len()]; OUTCOMES.len()],
    group_kills: AtomicU64,
    bytes_released: AtomicU64,
    /// Refused requests (kills, group kills, checks), by decision kind.
    refusals: [AtomicU64; KINDS.len()],
    checks: AtomicU64,
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    /// CheckPermission audit records not written (over the per-uid rate).
    audit_records_suppressed: AtomicU64,
    events_dropped: AtomicU64,
    /// From a KillAndReap request's arrival to its outcome.
    kill_latency: Histogram,
    /// From a KillCgroup request's arrival to its outcome.
    group_kill_latency: Histogram,
    /// CheckPermission, arrival to reply.
    check_latency: Histogram,
}

static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

fn outcome_index(outcome: Option<Outcome>) -> usize {
    match outcome {
        Some(Outcome::Reaped) => 0,
        Some(Outcome::ExitedBeforeReap) => 1,
        Some(Outcome::KilledNotReaped) => 2,
        Some(Outcome::AlreadyDying) => 3,
        Some(Outcome::ReapPending) => 5,
        // Unspecified is the wire's unknown value; the engine never
        // reports it.
        None | Some(Outcome::Unspecified) => 4,
    }
}

fn path_index(path: KillPath) -> usize {
    match path {
        KillPath::ReapKill => 0,
        KillPath::KillThenMrelease => 1,
        KillPath::KillOnly | KillPath::Unspecified => 2,
    }
}

impl Metrics {
    /// A number that grows with every connection and every check or kill:
    /// unchanged between two readings means the broker was idle between
    /// them.
    pub fn activity(&self) -> u64 {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let kills: u64 = self.kills.iter().flatten().map(load).sum();
        load(&self.checks)
            + load(&self.connections_accepted)
            + load(&self.connections_refused)
            + load(&self.group_kills)
            + kills
    }

    /// One process killed (`None`: the kill failed).
    pub fn killed(&self, outcome: Option<Outcome>, path: KillPath, bytes_released: u64) {
        self.kills[outcome_index(outcome)][path_index(path)].fetch_add(1, Ordering::Relaxed);
        self.bytes_released.fetch_add(bytes_released, Ordering::Relaxed);
    }

    /// Bytes a kill gave back that [`Metrics::killed`] did not count (a
    /// group kill's total).
    pub fn killed_bytes(&self, bytes: u64) {
        self.bytes_released.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn group_killed(&self, took: Duration) {
        self.group_kills.fetch_add(1, Ordering::Relaxed);
        self.group_kill_latency.observe(took);
    }

    pub fn kill_done(&self, took: Duration) {
        self.kill_latency.observe(took);
    }

    pub fn checked(&self, took: Duration) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        self.check_latency.observe(took);
    }

    /// A refusal of kind `kind` (`Allowed` is ignored).
    pub fn refused(&self, kind: DecisionKind) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn connection(&self, accepted: bool) {
        let counter = if accepted {
            &self.connections_accepted
        } else {
            &self.connections_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was counted (`open`) or uncounted.
    pub fn connection_open(&self, open: bool) {
        if open {
            self.connections_open.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn audit_suppressed(&self, records: u64) {
        self.audit_records_suppressed.fetch_add(records, Ordering::Relaxed);
    }

    pub fn event_dropped(&self) {
        self.events_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Every metric now, as `io.systemd.Metrics.List` replies them (and
    /// `reapctl stats` prints them), `gauges` added by the caller.
    pub fn snapshot(&self, gauges: &[(&'static str, u64)]) -> Vec<Metric> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for (o, outcome) in OUTCOMES.iter().enumerate() {
            for (p, path) in PATHS.iter().enumerate() {
                out.push(
                    Metric::counter("kills_total", load(&self.kills[o][p]))
                        .field("outcome", outcome)
                        .field("path", path),
                );
            }
        }
        out.push(Metric::counter("group_kills_total", load(&self.group_kills)));
        out.push(Metric::counter("bytes_released_total", load(&self.bytes_released)));
        for (i, kind) in KINDS.iter().enumerate() {
            out.push(Metric::counter("refusals_total", load(&self.refusals[i])).field("kind", kind.as_str()));
        }
        out.push(Metric::counter("checks_total", load(&self.checks)));
        out.push(Metric::counter(
            "connections_accepted_total",
            load(&self.connections_accepted),
        ));
        out.push(Metric::counter(
            "connections_refused_total",
            load(&self.connections_refused),
        ));
        out.push(Metric::counter(
            "audit_records_suppressed_total",
            load(&self.audit_records_suppressed),
        ));
        out.push(Metric::counter("events_dropped_total", load(&self.events_dropped)));
        for (name, histogram) in [
            ("kill_duration_seconds", &self.kill_latency),
            ("group_kill_duration_seconds", &self.group_kill_latency),
            ("check_duration_seconds", &self.check_latency),
        ] {
            let mut cumulative = 0;
            for (i, bucket) in histogram.buckets.iter().enumerate() {
                cumulative += load(bucket);
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |le| le.to_string());
                out.push(Metric::counter(bucket_name(name), cumulative).field("le", &le));
            }
            out.push(Metric::counter(count_name(name), load(&histogram.count)));
            out.push(Metric {
                name: sum_name(name),
                kind: MetricKind::Counter,
                value: serde_json::json!(load(&histogram.sum_ns) as f64 / 1e9),
                fields: Vec::new(),
            });
        }
        out.push(Metric {
            name: "connections_open".into(),
            kind: MetricKind::Gauge,
            value: serde_json::json!(load(&self.connections_open)),
            fields: Vec::new(),
        });
        for (name, value) in gauges {
            out.push(Metric {
                name: (*name).to_string(),
                kind: MetricKind::Gauge,
                value: serde_json::json!(value),
                fields: Vec::new(),
            });
        }
        out
    }
}

fn bucket_name(family: &str) -> String {
    format!("{family}_bucket")
}
fn count_name(family: &str) -> String {
    format!("{family}_count")
}
fn sum_name(family: &str) -> String {
    format!("{family}_sum")
}

/// systemd's metric family types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// One value: a name (without the `io.reapd.` prefix), its value, and the
/// fields that tell it from others of its family.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub kind: MetricKind,
    pub value: serde_json::Value,
    pub fields: Vec<(String, String)>,
}

impl Metric {
    fn counter(name: impl Into<String>, value: u64) -> Self {
        Metric {
            name: name.into(),
            kind: MetricKind::Counter,
            value: serde_json::json!(value),
            fields: Vec::new(),
        }
    }

    fn field(mut self, key: &str, value: &str) -> Self {
        self.fields.push((key.to_string(), value.to_string()));
        self
    }
}

/// Each metric family: its name, type and description (`Describe`).
pub const FAMILIES: &[(&str, MetricKind, &str)] = &[
    ("kills_total", MetricKind::Counter, "Processes killed, by outcome and kill path (a group kill counts each member; outcome \"failed\": the kill itself failed)"),
    ("group_kills_total", MetricKind::Counter, "Whole-cgroup kills done"),
    ("bytes_released_total", MetricKind::Counter, "Bytes the kills gave back to the system (sum of bytes_released)"),
    ("refusals_total", MetricKind::Counter, "Requests refused, by decision kind"),
    ("checks_total", MetricKind::Counter, "CheckPermission requests answered"),
    ("connections_accepted_total", MetricKind::Counter, "Connections accepted, both transports"),
    ("connections_refused_total", MetricKind::Counter, "Connections refused (over a cap, or the peer could not be identified)"),
    ("audit_records_suppressed_total", MetricKind::Counter, "CheckPermission audit records not written because the caller's uid was over its rate (each window is summarised in a check_suppressed record)"),
    ("events_dropped_total", MetricKind::Counter, "Kill events dropped because a subscriber's queue was full"),
    ("kill_duration_seconds", MetricKind::Counter, "KillAndReap from arrival to outcome: _bucket{le}, _count, _sum"),
    ("group_kill_duration_seconds", MetricKind::Counter, "KillCgroup from arrival to outcome: _bucket{le}, _count, _sum"),
    ("check_duration_seconds", MetricKind::Counter, "CheckPermission from arrival to reply: _bucket{le}, _count, _sum"),
    ("connections_open", MetricKind::Gauge, "Connections open now, both transports"),
    ("kills_in_flight", MetricKind::Gauge, "Kills started whose outcome is not yet recorded"),
    ("event_subscribers", MetricKind::Gauge, "Kill-event subscriptions open"),
    ("reaps_stalled", MetricKind::Gauge, "Reaps still running after their caller was answered \"reap pending\" (process_mrelease waiting on a victim's mmap lock)"),
];

/// The prefix of every metric name on the wire (`io.systemd.Metrics`
/// names are qualified by their service).
pub const PREFIX: &str = "io.reapd.";
