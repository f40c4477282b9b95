// SPDX-License-Identifier: MIT OR Apache-2.0
//! Reaper threads: where every single-process reap (`process_mrelease` and
//! the release figure after it) runs, so that a reap the kernel never ends
//! holds neither the request nor anything the request holds.
//!
//! `process_mrelease(2)` takes the victim's mmap lock with
//! `mmap_read_lock_killable()`: another process of the victim's uid can keep
//! that lock held indefinitely (a `/proc/VICTIM/mem` read stuck on a FUSE
//! page whose READ is never answered, with a writer queued behind it:
//! docs/threats.md, "A reap that never ends"). The broker cannot interrupt
//! the syscall, so it gives it a thread of its own and waits for it at most
//! [`REAP_ANSWER_AFTER`]; after that the caller is answered "reap pending",
//! its in-flight slots are released and its outcome record written, and
//! the thread stays with the reap (a follow-up record when it ends). A
//! stalled thread is never reused: the next reap finds no idle thread and
//! starts a new one.
//!
//! Stalled reaps are capped per victim uid ([`MAX_STALLED_PER_UID`]) and
//! broker-wide ([`MAX_STALLED`]); beyond either cap a kill is SIGKILL only
//! (what the kernel does by default), and its reply says why. The caps
//! bound the threads one uid's stall-prone processes can pin: at most
//! [`MAX_STALLED_PER_UID`] plus the reaps admitted within one answer bound
//! before any of them was seen stalled, which the in-flight limits bound
//! (`limits::MAX_KILLS_IN_FLIGHT`). Such a burst may leave one uid with
//! more stalled reaps than its cap; broker-wide each uid counts only up to
//! its cap, so one uid alone cannot fill [`MAX_STALLED`] and skip other
//! victims' reaps: that takes `MAX_STALLED / MAX_STALLED_PER_UID` uids.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Longest a kill's caller waits for its reap before it is answered
/// "reap pending". The kernel's own OOM reaper waits 2 s
/// (`OOM_REAPER_DELAY`) before it reaps; an OOM manager's decision loop
/// needs its answer sooner than the seconds a stalled lock can last. An
/// honest reap is ~10 MiB/ms: 2 s covers ~20 GiB; a bigger victim's reply
/// says "reap pending" (its memory figure is in the follow-up record) but
/// loses nothing else.
pub const REAP_ANSWER_AFTER: Duration = Duration::from_secs(2);

/// Stalled reaps (running past [`REAP_ANSWER_AFTER`]) of one victim uid's
/// processes beyond which its further kills skip the reap.
pub const MAX_STALLED_PER_UID: u32 = 2;

/// Stalled reaps, all victim uids, beyond which every kill skips the reap.
pub const MAX_STALLED: u32 = 8;

/// Idle reaper threads kept for the next kill; more exit after
/// [`IDLE_KEEP`] without work.
const IDLE_THREADS: usize = 2;
const IDLE_KEEP: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Who a reap is for: to count it against its victim uid's cap, and to
/// name it in the record written at shutdown while it is still stalled.
#[derive(Debug, Clone)]
pub struct ReapOf {
    pub target_pid: i32,
    pub target_uid: u32,
    pub target_comm: String,
    pub caller_pid: i32,
    pub caller_uid: u32,
}

#[derive(Default)]
struct Pool {
    state: Mutex<State>,
    work: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Stalled reaps by victim uid, and all together.
    stalled_by_uid: HashMap<u32, u32>,
    stalled: u32,
    /// The stalled reaps themselves, for the shutdown record.
    stalled_reaps: HashMap<u64, (ReapOf, Instant, bool)>,
    next_id: u64,
}

static POOL: std::sync::LazyLock<Pool> = std::sync::LazyLock::new(Pool::default);

fn state() -> MutexGuard<'static, State> {
    POOL.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a finished reap's result goes: to the request while it waits, to
/// the follow-up once it has been answered "pending".
enum Slot<T> {
    Waiting(oneshot::Sender<T>),
    Late(Box<dyn FnOnce(T) + Send>, u64),
    Taken,
}

/// A reap submitted to a reaper thread; [`Reap::wait`] for its result.
pub struct Reap<T> {
    slot: Arc<Mutex<Slot<T>>>,
    result: oneshot::Receiver<T>,
    of: ReapOf,
}

/// Work for a reaper thread, which comes back unrun when refused.
pub trait Work: Send + 'static {
    type Output: Send + 'static;
    fn run(self) -> Self::Output;
}

/// Why a reap was not started: too many reaps stalled, or no thread.
#[derive(Debug)]
pub struct Refused<F> {
    pub work: F,
    pub reason: String,
}

/// Runs `work` (a reap) on a reaper thread, unless [`MAX_STALLED_PER_UID`]
/// or [`MAX_STALLED`] reaps are stalled already or no thread can be
/// started: then `work` comes back with the reason.
pub fn submit<W: Work>(of: ReapOf, work: W) -> Result<Reap<W::Output>, Refused<W>> {
    let mut state = state();
    let by_uid = state.stalled_by_uid.get(&of.target_uid).copied().unwrap_or(0);
    if by_uid >= MAX_STALLED_PER_UID {
        return Err(Refused {
            work,
            reason: format!(
                "reap skipped: {by_uid} reaps of uid {}'s processes are stalled (limit {MAX_STALLED_PER_UID}); killed only, it frees its memory on its own exit path",
                of.target_uid
            ),
        });
    }
    // A uid's stalled reaps count broker-wide up to its own cap only: all
    // the reaps one uid's burst of kills gets admitted within one answer
    // bound (before any is seen stalled; up to its 16 in flight) may stall
    // together, and would otherwise fill the broker-wide cap alone and skip
    // every other victim's reap for as long as that uid keeps them stalled.
    let charged = state.charged();
    if charged >= MAX_STALLED {
        return Err(Refused {
            work,
            reason: format!(
                "reap skipped: {charged} reaps are stalled broker-wide (limit {MAX_STALLED}, at most {MAX_STALLED_PER_UID} counted per victim uid); killed only, it frees its memory on its own exit path"
            ),
        });
    }
    if state.idle <= state.queue.len() {
        // Every thread is busy (or stalled): one more, which stays for
        // later reaps while fewer than IDLE_THREADS wait.
        let spawned = std::thread::Builder::new()
            .name("reapd-reap".into())
            .stack_size(512 << 10)
            .spawn(reaper_thread);
        if let Err(err) = spawned {
            return Err(Refused {
                work,
                reason: format!("reap skipped: no reaper thread could be started ({err}); killed only"),
            });
        }
        // Counted idle until it takes a job (it takes this one).
        state.idle += 1;
    }
    let (tx, rx) = oneshot::channel();
    let slot = Arc::new(Mutex::new(Slot::Waiting(tx)));
    let done = Arc::clone(&slot);
    state.queue.push_back(Box::new(move || {
        // A panic (reported by the hook) ends this reap, not the thread,
        // and never leaves it counted as stalled: its waiter finds the
        // result gone and answers "pending", its follow-up is not written.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.run()));
        let taken = std::mem::replace(&mut *done.lock().unwrap_or_else(|p| p.into_inner()), Slot::Taken);
        match (taken, result) {
            (Slot::Waiting(tx), Ok(result)) => {
                let _ = tx.send(result);
            }
            (Slot::Late(follow_up, id), Ok(result)) => {
                unstall(id);
                follow_up(result);
            }
            (Slot::Late(_, id), Err(_)) => unstall(id),
            (Slot::Waiting(_) | Slot::Taken, _) => {}
        }
    }));
    drop(state);
    POOL.work.notify_one();
    Ok(Reap { slot, result: rx, of })
}

impl<T: Send + 'static> Reap<T> {
    /// The reap's result if it ends within `bound`; otherwise `Err`, the
    /// reap counts as stalled from now, and `follow_up` gets its result
    /// when (if ever) it ends.
    pub async fn wait(mut self, bound: Duration, follow_up: impl FnOnce(T) + Send + 'static) -> Result<T, Stalled> {
        if let Ok(Ok(result)) = tokio::time::timeout(bound, &mut self.result).await {
            return Ok(result);
        }
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Waiting(_) => {
                let mut state = state();
                let id = state.next_id;
                state.next_id += 1;
                *state.stalled_by_uid.entry(self.of.target_uid).or_default() += 1;
                state.stalled += 1;
                let since = Instant::now();
                state.stalled_reaps.insert(id, (self.of, since, false));
                *slot = Slot::Late(Box::new(follow_up), id);
                Err(Stalled)
            }
            // It ended between the timeout and the lock: the result is sent.
            _ => self.result.try_recv().map_err(|_| Stalled),
        }
    }
}

/// The reap outlived the answer bound.
#[derive(Debug)]
pub struct Stalled;

fn unstall(id: u64) {
    let mut state = state();
    if let Some((of, _, _)) = state.stalled_reaps.remove(&id) {
        state.stalled -= 1;
        if let Some(n) = state.stalled_by_uid.get_mut(&of.target_uid) {
            *n -= 1;
            if *n == 0 {
                state.stalled_by_uid.remove(&of.target_uid);
            }
        }
    }
}

/// One stalled reap counted broker-wide that is not a [`Reap`] of this
/// pool (a group kill's reaper thread, see `group::reap_members`);
/// uncounted on drop, when that reap ends.
pub struct StalledElsewhere(());

impl StalledElsewhere {
    pub fn count() -> StalledElsewhere {
        state().stalled += 1;
        StalledElsewhere(())
    }
}

impl Drop for StalledElsewhere {
    fn drop(&mut self) {
        let mut state = state();
        state.stalled = state.stalled.saturating_sub(1);
    }
}

impl State {
    /// Stalled reaps as the broker-wide cap counts them: each victim uid's
    /// up to [`MAX_STALLED_PER_UID`] (see [`submit`]), and group kills'.
    fn charged(&self) -> u32 {
        let over_uid_caps: u32 = self
            .stalled_by_uid
            .values()
            .map(|n| n.saturating_sub(MAX_STALLED_PER_UID))
            .sum();
        self.stalled.saturating_sub(over_uid_caps)
    }
}

/// Stalled reaps now, all victim uids.
pub fn stalled() -> u32 {
    state().stalled
}

/// Stalled reaps counted against [`MAX_STALLED`]: what a group kill checks
/// before its reaps, like [`submit`] does.
pub fn stalled_charged() -> u32 {
    state().charged()
}

/// The reaps stalled now and how long since they were answered pending,
/// each once (shutdown may drain twice): shutdown records them, as the
/// broker exits without their end.
pub fn stalled_reaps_at_shutdown() -> Vec<(ReapOf, Duration)> {
    state()
        .stalled_reaps
        .values_mut()
        .filter(|(_, _, reported)| !*reported)
        .map(|(of, since, reported)| {
            *reported = true;
            (of.clone(), since.elapsed())
        })
        .collect()
}

fn reaper_thread() {
    let mut state = state();
    loop {
        if let Some(job) = state.queue.pop_front() {
            state.idle -= 1;
            drop(state);
            job();
            state = self::state();
            state.idle += 1;
            continue;
        }
        let (next, timeout) = POOL
            .work
            .wait_timeout(state, IDLE_KEEP)
            .unwrap_or_else(|p| p.into_inner());
        state = next;
        if timeout.timed_out() && state.queue.is_empty() && state.idle > IDLE_THREADS {
            state.idle -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Call<T>(Box<dyn FnOnce() -> T + Send>);

    impl<T: Send + 'static> Work for Call<T> {
        type Output = T;
        fn run(self) -> T {
            (self.0)()
        }
    }

    fn call<T>(f: impl FnOnce() -> T + Send + 'static) -> Call<T> {
        Call(Box::new(f))
    }

    fn of(uid: u32) -> ReapOf {
        ReapOf {
            target_pid: 1,
            target_uid: uid,
            target_comm: String::new(),
            caller_pid: 1,
            caller_uid: 0,
        }
    }

    /// A reap that ends in time is answered with its result; one that does
    /// not is answered stalled, counts against its uid's cap (further
    /// reaps of that uid are refused and get their work back) and the
    /// broker-wide one, and its result reaches the follow-up when it ends,
    /// which lifts the count.
    #[test]
    fn stalled_reaps_are_answered_capped_and_followed_up() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let uid = 4_000_000_001;
            let quick = submit(of(uid), call(|| 7)).ok().unwrap();
            assert_eq!(quick.wait(Duration::from_secs(5), |_| {}).await.unwrap(), 7);

            let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
            let release_rx = Arc::new(Mutex::new(release_rx));
            let (late_tx, late_rx) = std::sync::mpsc::channel();
            for _ in 0..MAX_STALLED_PER_UID {
                let gate = Arc::clone(&release_rx);
                let reap = submit(
                    of(uid),
                    call(move || {
                        let _ = gate.lock().unwrap().recv();
                        42
                    }),
                )
                .ok()
                .unwrap();
                let late = late_tx.clone();
                assert!(reap
                    .wait(Duration::from_millis(20), move |v| late.send(v).unwrap())
                    .await
                    .is_err());
            }
            let refused = submit(of(uid), call(|| 0)).err().expect("over the per-uid cap");
            assert!(refused.reason.contains("stalled"), "{}", refused.reason);
            assert_eq!(refused.work.run(), 0);
            assert!(submit(of(uid + 1), call(|| 1)).is_ok(), "another uid is not capped");
            for _ in 0..MAX_STALLED_PER_UID {
                release_tx.send(()).unwrap();
                assert_eq!(late_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
            }
            assert!(reapd_wait(|| !state().stalled_by_uid.contains_key(&uid)));
            assert!(submit(of(uid), call(|| 0)).is_ok(), "the cap lifts when the reaps end");

            // Broker-wide: one stalled reap each of MAX_STALLED uids.
            let mut answers = Vec::new();
            for n in 0..MAX_STALLED {
                let gate = Arc::clone(&release_rx);
                let reap = submit(
                    of(uid + 10 + n),
                    call(move || {
                        let _ = gate.lock().unwrap().recv();
                        43
                    }),
                )
                .ok()
                .unwrap();
                let late = late_tx.clone();
                answers.push(
                    reap.wait(Duration::from_millis(20), move |v| late.send(v).unwrap())
                        .await,
                );
            }
            assert!(answers.iter().all(Result::is_err));
            let refused = submit(of(uid + 100), call(|| 0))
                .err()
                .expect("over the broker-wide cap");
            assert!(refused.reason.contains("broker-wide"), "{}", refused.reason);
            for _ in 0..MAX_STALLED {
                release_tx.send(()).unwrap();
                assert_eq!(late_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 43);
            }
            assert!(reapd_wait(|| stalled() == 0));

            // One uid's burst: more reaps admitted than the broker-wide cap
            // before any was seen stalled. They all stall, its uid is over
            // its cap, but broker-wide it counts as MAX_STALLED_PER_UID:
            // another uid's reap still runs.
            let burst_uid = uid + 200;
            let mut reaps = Vec::new();
            for _ in 0..=MAX_STALLED {
                let gate = Arc::clone(&release_rx);
                reaps.push(
                    submit(
                        of(burst_uid),
                        call(move || {
                            let _ = gate.lock().unwrap().recv();
                            44
                        }),
                    )
                    .ok()
                    .unwrap(),
                );
            }
            for reap in reaps {
                let late = late_tx.clone();
                assert!(reap
                    .wait(Duration::from_millis(20), move |v| late.send(v).unwrap())
                    .await
                    .is_err());
            }
            assert_eq!(stalled(), MAX_STALLED + 1);
            assert!(submit(of(burst_uid), call(|| 0)).is_err(), "over its own cap");
            assert_eq!(stalled_charged(), MAX_STALLED_PER_UID);
            let other = submit(of(burst_uid + 1), call(|| 5))
                .ok()
                .expect("one uid fills no broker-wide cap");
            assert_eq!(other.wait(Duration::from_secs(5), |_| {}).await.unwrap(), 5);
            for _ in 0..=MAX_STALLED {
                release_tx.send(()).unwrap();
                assert_eq!(late_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 44);
            }
            assert!(reapd_wait(|| stalled() == 0));
        });
    }

    fn reapd_wait(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}
