// SPDX-License-Identifier: MIT OR Apache-2.0
//! Kill events: one per kill (of a process, or of a whole cgroup), sent to
//! the subscribers entitled to see it (`WatchKills` on both transports).
//!
//! Publishing never waits. Each subscriber has its own bounded queue
//! ([`QUEUE_DEPTH`] events); an event that does not fit is dropped for that
//! subscriber only and counted, and the next event it receives carries the
//! count (`dropped`). A stalled subscriber therefore costs kills nothing and
//! still learns that it missed events. Publishing runs after the kill's
//! outcome record, in the kill's own task: never between a decision and its
//! SIGKILL.
//!
//! Entitlement ([`Policy::watch_grant`]) is decided when the event is
//! published, per victim, with the facts the kill was decided on and the
//! subscriber's identity from its connection: root, the victim's owner, or a
//! caller an allow rule with the `watch` action grants. A subscriber sees
//! only the victims it is entitled to; an event with none is not sent to it
//! at all (and not counted as dropped).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::engine::caller::{Caller, CallerPidns};
use crate::engine::error::EngineError;
use crate::engine::policy::Policy;
use crate::engine::reaper::Outcome;
use crate::engine::target::{ProcessInfo, TargetProcess};
use crate::os::features::KillPath;
use crate::os::procfs::Memory;

/// Events one subscriber may have waiting; beyond this they are dropped
/// (for it alone) and counted.
pub const QUEUE_DEPTH: usize = 256;
/// Subscriptions open at once in one [`Pool`].
pub const MAX_SUBSCRIBERS: usize = 128;
/// Subscriptions one uid may hold at once (a watcher needs one).
pub const MAX_SUBSCRIBERS_PER_UID: usize = 4;
/// Victims one event lists at most (a cgroup kill may hit thousands; an
/// event stays one bounded message). Beyond it, `complete` is false.
pub const MAX_EVENT_VICTIMS: usize = 256;

/// Which shared cap a subscription counts against. Any uid may subscribe
/// (to its own processes' kills), so one user with many uids (a subuid
/// range, a user namespace's mapping) can fill a pool of
/// [`MAX_SUBSCRIBERS`]; it must never take the slots of root or of the
/// watchers the policy names, which therefore have pools of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Root holding CAP_KILL: bounded by the per-uid cap alone.
    Root,
    /// Callers an allow `watch` rule names.
    Named,
    /// Everyone else (owners of their own processes).
    Shared,
}

pub use reapd_proto::model::KillKind;

/// Who asked for the kill (its connection's identity): the API's type.
pub use reapd_proto::model::Requester;

/// One process a kill hit.
#[derive(Debug, Clone, Serialize)]
pub struct Victim {
    /// `pid` is in the broker's pid namespace; 0 for a subscriber in
    /// another one (a dead process's pid cannot be translated).
    pub process: ProcessInfo,
    pub memory_before: Memory,
    pub outcome: Outcome,
    pub not_reaped_reason: String,
    /// Why this subscriber sees it: "root", "owner" or a watch rule's name.
    pub seen_as: String,
}

/// One kill, as a subscriber receives it.
#[derive(Debug, Clone, Serialize)]
pub struct KillEvent {
    /// Broker-wide, increasing by one per kill (gaps: kills this subscriber
    /// may not see, or dropped ones).
    pub sequence: u64,
    /// When the outcome was known (wall clock).
    pub time: SystemTime,
    pub kind: KillKind,
    pub requester: Requester,
    /// The rule that allowed the kill ("kill(2)" or a rule's name; for a
    /// cgroup, its members' rules, comma-separated). Empty unless
    /// `complete`: the rules that allowed other users' members are not
    /// this subscriber's to see.
    pub rule: String,
    /// The cgroup killed, for [`KillKind::Cgroup`] ("" otherwise).
    pub cgroup: String,
    pub kill_path: KillPath,
    /// The victims this subscriber may see (all of a process kill's one).
    pub victims: Vec<Victim>,
    /// Whether `victims` is every process the kill hit.
    pub complete: bool,
    /// What the kill gave back to the system, as the requester's reply
    /// says; 0 unless `complete`.
    pub bytes_released: u64,
    /// From the first SIGKILL until the last reap returned.
    pub kill_to_reap: Duration,
    /// From the request's arrival until its outcome.
    pub elapsed: Duration,
    /// Events dropped for this subscriber (its queue was full) between the
    /// previous event it received and this one.
    pub dropped: u64,
}

/// A kill about to be published: everything but the per-subscriber parts.
pub struct KillRecord<'a> {
    pub kind: KillKind,
    /// Its pid is in the broker's pid namespace.
    pub requester: Requester,
    pub rule: &'a str,
    pub cgroup: &'a str,
    pub kill_path: KillPath,
    /// Each victim with the facts its kill was decided on.
    pub victims: Vec<(&'a TargetProcess, VictimOutcome)>,
    pub bytes_released: u64,
    pub kill_to_reap: Duration,
    pub elapsed: Duration,
}

/// What happened to one victim.
#[derive(Debug, Clone)]
pub struct VictimOutcome {
    pub memory_before: Memory,
    pub outcome: Outcome,
    pub not_reaped_reason: String,
}

struct Subscriber {
    id: u64,
    caller: Arc<Caller>,
    pool: Pool,
    queue: mpsc::Sender<KillEvent>,
    /// Events dropped since the last one queued.
    dropped: AtomicU64,
}

#[derive(Default)]
struct Subscribers {
    list: Vec<Arc<Subscriber>>,
    next_id: u64,
    closed: bool,
}

/// The subscribers and the event sequence. Owned by the engine.
#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Subscribers>,
    sequence: AtomicU64,
}

/// One subscriber's end: events arrive through [`Subscription::next`];
/// dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    hub: Arc<EventHub>,
    queue: mpsc::Receiver<KillEvent>,
}

/// The requester of a kill: its connection's identity.
pub fn requester_of(caller: &Caller) -> Requester {
    Requester {
        pid: caller.pid,
        uid: caller.uid,
        comm: caller.comm.clone(),
    }
}

impl Subscription {
    /// The next event, or `None` once the broker is shutting down.
    pub async fn next(&mut self) -> Option<KillEvent> {
        self.queue.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subscribers = self.hub.lock();
        subscribers.list.retain(|s| s.id != self.id);
    }
}

impl EventHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `caller`, counted in `pool`. Errors: RESOURCE_EXHAUSTED
    /// beyond [`MAX_SUBSCRIBERS_PER_UID`] for its uid or [`MAX_SUBSCRIBERS`]
    /// in its pool (but [`Pool::Root`]). After [`EventHub::close`] the
    /// subscription ends at once.
    pub fn subscribe(self: &Arc<Self>, caller: Arc<Caller>, pool: Pool) -> Result<Subscription, EngineError> {
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let mut subscribers = self.lock();
        let id = subscribers.next_id;
        subscribers.next_id += 1;
        if !subscribers.closed {
            let of_uid = subscribers.list.iter().filter(|s| s.caller.uid == caller.uid).count();
            let over = if of_uid >= MAX_SUBSCRIBERS_PER_UID {
                Some(format!(
                    "uid {} already holds {of_uid} kill-event subscriptions (at most {MAX_SUBSCRIBERS_PER_UID})",
                    caller.uid
                ))
            } else if pool != Pool::Root
                && subscribers.list.iter().filter(|s| s.pool == pool).count() >= MAX_SUBSCRIBERS
            {
                Some(format!(
                    "the broker already serves {MAX_SUBSCRIBERS} kill-event subscriptions of {pool:?} callers"
                ))
            } else {
                None
            };
            if let Some(reason) = over {
                return Err(EngineError::RateLimited {
                    reason,
                    retry_after: Duration::from_secs(1),
                });
            }
            subscribers.list.push(Arc::new(Subscriber {
                id,
                caller,
                pool,
                queue: sender,
                dropped: AtomicU64::new(0),
            }));
        }
        // Closed: `sender` is dropped here, so the subscription ends at once.
        Ok(Subscription {
            id,
            hub: Arc::clone(self),
            queue: receiver,
        })
    }

    /// Subscriptions open now.
    pub fn subscribers(&self) -> usize {
        self.lock().list.len()
    }

    /// Ends every subscription (at shutdown) and refuses new ones.
    pub fn close(&self) {
        let mut subscribers = self.lock();
        subscribers.closed = true;
        subscribers.list.clear();
    }

    /// Sends `record` to every subscriber entitled to see any of its
    /// victims, under `policy` (the snapshot current at publish time).
    /// Never blocks: a full queue drops the event for that subscriber and
    /// counts it.
    pub fn publish(&self, policy: &Policy, record: KillRecord<'_>) {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        // A snapshot, so entitlement checks run without the lock.
        let subscribers: Vec<Arc<Subscriber>> = self.lock().list.clone();
        if subscribers.is_empty() {
            return;
        }
        let time = SystemTime::now();
        for subscriber in subscribers {
            let same_namespace = matches!(subscriber.caller.pidns, CallerPidns::Broker);
            let victims: Vec<Victim> = record
                .victims
                .iter()
                .filter_map(|(target, outcome)| {
                    let seen_as = policy.watch_grant(&subscriber.caller, target)?;
                    let mut process = target.info();
                    process.pid = if same_namespace { target.pid } else { 0 };
                    Some(Victim {
                        process,
                        memory_before: outcome.memory_before,
                        outcome: outcome.outcome,
                        not_reaped_reason: outcome.not_reaped_reason.clone(),
                        seen_as,
                    })
                })
                .collect();
            if victims.is_empty() {
                continue;
            }
            let complete = victims.len() == record.victims.len() && victims.len() <= MAX_EVENT_VICTIMS;
            let mut victims = victims;
            victims.truncate(MAX_EVENT_VICTIMS);
            let event = KillEvent {
                sequence,
                time,
                kind: record.kind,
                requester: Requester {
                    pid: if same_namespace { record.requester.pid } else { 0 },
                    ..record.requester.clone()
                },
                // A group's rules may be other users' grants: shown only to
                // a subscriber who sees every victim.
                rule: if complete {
                    record.rule.to_string()
                } else {
                    String::new()
                },
                cgroup: record.cgroup.to_string(),
                kill_path: record.kill_path,
                victims,
                complete,
                bytes_released: if complete { record.bytes_released } else { 0 },
                kill_to_reap: record.kill_to_reap,
                elapsed: record.elapsed,
                dropped: 0,
            };
            // The event carries the drops that came before it; if it is
            // dropped too, they (and it) wait for the next one.
            let earlier = subscriber.dropped.swap(0, Ordering::Relaxed);
            let event = KillEvent {
                dropped: earlier,
                ..event
            };
            match subscriber.queue.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.dropped.fetch_add(earlier + 1, Ordering::Relaxed);
                    crate::engine::metrics::get().event_dropped();
                }
                // The subscription is being dropped; its Drop unlists it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::{compile, Nss};

    fn caller(uid: u32) -> Arc<Caller> {
        Arc::new(Caller {
            pid: 100 + uid as i32,
            uid,
            gid: uid,
            real_uid: Some(uid),
            groups: Vec::new(),
            comm: "watcher".into(),
            cgroup: None,
            pidns: CallerPidns::Broker,
            userns_capabilities: false,
            cap_kill: uid == 0,
            pidfd: None,
        })
    }

    fn target(uid: u32) -> TargetProcess {
        TargetProcess {
            pidfd: std::fs::File::open("/dev/null").unwrap().into(),
            pid: 5000 + uid as i32,
            caller_pid: 5000 + uid as i32,
            ruid: uid,
            euid: uid,
            suid: uid,
            gid: uid,
            comm: "victim".into(),
            start_time: 1,
            cgroup: None,
            is_kernel_thread: false,
            oom_score_adj: 0,
            memory: None,
            namespaced: None,
        }
    }

    fn record<'a>(victims: &'a [TargetProcess]) -> KillRecord<'a> {
        KillRecord {
            kind: KillKind::Process,
            requester: Requester {
                pid: 7,
                uid: 1,
                comm: "killer".into(),
            },
            rule: "kill(2)",
            cgroup: "",
            kill_path: KillPath::KillThenMrelease,
            victims: victims
                .iter()
                .map(|t| {
                    (
                        t,
                        VictimOutcome {
                            memory_before: Memory::default(),
                            outcome: Outcome::Reaped,
                            not_reaped_reason: String::new(),
                        },
                    )
                })
                .collect(),
            bytes_released: 4096,
            kill_to_reap: Duration::from_millis(1),
            elapsed: Duration::from_millis(2),
        }
    }

    fn policy(text: &str) -> Policy {
        compile("test.toml", text, &Nss).unwrap().0
    }

    impl EventHub {
        fn subscribe_test(self: &Arc<Self>, caller: Arc<Caller>) -> Result<Subscription, EngineError> {
            self.subscribe(caller, Pool::Shared)
        }
    }

    fn try_next(subscription: &mut Subscription) -> Option<KillEvent> {
        subscription.queue.try_recv().ok()
    }

    #[test]
    fn root_owner_and_watch_grantees_see_kills_others_do_not() {
        let hub = Arc::new(EventHub::default());
        let policy = policy(
            "[[rule]]\nname = \"ops\"\nactions = [\"watch\"]\ncaller.uids = [300]\ntarget.uids = [200]\n\
             [[rule]]\nname = \"hide-400\"\neffect = \"deny\"\nactions = [\"watch\"]\ncaller.any = true\ntarget.uids = [400]\n",
        );
        let mut root = hub.subscribe_test(caller(0)).unwrap();
        let mut owner = hub.subscribe_test(caller(200)).unwrap();
        let mut ops = hub.subscribe_test(caller(300)).unwrap();
        let mut stranger = hub.subscribe_test(caller(201)).unwrap();
        let mut owner_400 = hub.subscribe_test(caller(400)).unwrap();
        hub.publish(&policy, record(&[target(200)]));
        hub.publish(&policy, record(&[target(400)]));
        let seen = |s: &mut Subscription| {
            let mut out = Vec::new();
            while let Some(e) = try_next(s) {
                out.push((e.sequence, e.victims[0].seen_as.clone()));
            }
            out
        };
        // The deny rule hides uid 400's kills from everyone, its owner and
        // root included: deny wins, as everywhere in the policy.
        assert_eq!(seen(&mut root), vec![(1, "root".to_string())]);
        assert_eq!(seen(&mut owner), vec![(1, "owner".to_string())]);
        assert_eq!(seen(&mut ops), vec![(1, "ops".to_string())]);
        assert_eq!(seen(&mut stranger), vec![]);
        assert_eq!(seen(&mut owner_400), vec![]);
    }

    #[test]
    fn a_group_event_lists_only_the_victims_a_subscriber_may_see() {
        let hub = Arc::new(EventHub::default());
        let policy = Policy::default();
        let mut owner = hub.subscribe_test(caller(200)).unwrap();
        let mut root = hub.subscribe_test(caller(0)).unwrap();
        let victims = [target(200), target(201), target(200)];
        hub.publish(&policy, record(&victims));
        let mine = try_next(&mut owner).unwrap();
        assert_eq!(mine.victims.len(), 2);
        assert!(!mine.complete);
        assert_eq!(mine.rule, "", "other members' rules are not the owner's to see");
        assert_eq!(mine.bytes_released, 0, "the total is not the owner's to see");
        let all = try_next(&mut root).unwrap();
        assert_eq!(all.victims.len(), 3);
        assert!(all.complete);
        assert_eq!(all.bytes_released, 4096);
    }

    #[test]
    fn a_full_queue_drops_and_the_next_event_counts_the_drops() {
        let hub = Arc::new(EventHub::default());
        let policy = Policy::default();
        let mut slow = hub.subscribe_test(caller(0)).unwrap();
        let victims = [target(200)];
        for _ in 0..QUEUE_DEPTH + 10 {
            hub.publish(&policy, record(&victims));
        }
        let mut received = 0;
        while let Some(e) = try_next(&mut slow) {
            assert_eq!(e.dropped, 0);
            received += 1;
        }
        assert_eq!(received, QUEUE_DEPTH);
        hub.publish(&policy, record(&victims));
        let next = try_next(&mut slow).unwrap();
        assert_eq!(next.dropped, 10);
        assert_eq!(next.sequence, QUEUE_DEPTH as u64 + 11);
    }

    #[test]
    fn subscriptions_are_capped_per_uid_and_released_on_drop() {
        let hub = Arc::new(EventHub::default());
        let held: Vec<_> = (0..MAX_SUBSCRIBERS_PER_UID)
            .map(|_| hub.subscribe_test(caller(200)).unwrap())
            .collect();
        assert!(matches!(
            hub.subscribe_test(caller(200)),
            Err(EngineError::RateLimited { .. })
        ));
        assert!(hub.subscribe_test(caller(201)).is_ok());
        drop(held);
        assert_eq!(hub.subscribers(), 0);
        assert!(hub.subscribe_test(caller(200)).is_ok());
    }

    #[test]
    fn a_crowd_of_uids_fills_its_pool_but_not_root_s_or_the_named_one() {
        let hub = Arc::new(EventHub::default());
        let crowd: Vec<_> = (0..MAX_SUBSCRIBERS as u32)
            .map(|i| hub.subscribe(caller(1000 + i / 4), Pool::Shared).unwrap())
            .collect();
        assert!(matches!(
            hub.subscribe(caller(5000), Pool::Shared),
            Err(EngineError::RateLimited { .. })
        ));
        assert!(hub.subscribe(caller(0), Pool::Root).is_ok());
        assert!(hub.subscribe(caller(300), Pool::Named).is_ok());
        drop(crowd);
    }

    #[test]
    fn close_ends_every_stream_and_new_ones_at_once() {
        let hub = Arc::new(EventHub::default());
        let mut before = hub.subscribe_test(caller(0)).unwrap();
        hub.close();
        let mut after = hub.subscribe_test(caller(0)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(runtime.block_on(before.next()).is_none());
        assert!(runtime.block_on(after.next()).is_none());
    }
}
