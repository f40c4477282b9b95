// SPDX-License-Identifier: MIT OR Apache-2.0
//! Reaper threads: where every reap (`process_mrelease` and the release
//! figure after it), of a single kill or of a cgroup's member, runs, so that
//! a reap the kernel never ends holds neither the request nor anything the
//! request holds.
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
//! stalled thread is never reused.
//!
//! Admission is counted in reaps *running* (started and not ended, stalled
//! ones included), so it bounds threads, not only stalls:
//! - per victim uid, [`MAX_RUNNING_PER_UID`]: one uid's stall-prone
//!   processes pin at most that many threads, however many kills of them
//!   arrive at once;
//! - for victims in a user namespace other than the broker's, all together,
//!   [`MAX_RUNNING_NAMESPACED`]: such a namespace can hold a whole range of
//!   host uids (a container, a user's subordinate uids), each a uid of its
//!   own above; together they take at most this share;
//! - broker-wide, [`MAX_RUNNING`]: the reaper threads (plus
//!   `IDLE_THREADS` idle).
//!
//! A reap over a limit waits, in order, for one to end, until its request's
//! answer bound; then (or at once, when every reap holding that limit is
//! stalled) it is not run: the kill is SIGKILL only (what the kernel does
//! by default) and its reply says which limit. Honest reaps of one uid's
//! processes thus run two at a time rather than being skipped; to skip
//! other victims' reaps, stall-prone processes are needed under
//! `MAX_RUNNING / MAX_RUNNING_PER_UID` uids of the broker's own user
//! namespace (distinct users: a namespace's uids share one budget).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest a kill's caller waits for its reap, queueing for a thread
/// included, before it is answered "reap pending" (or, never started, "reap
/// skipped"). The kernel's own OOM reaper waits 2 s (`OOM_REAPER_DELAY`)
/// before it reaps; an OOM manager's decision loop needs its answer sooner
/// than the seconds a stalled lock can last. An honest reap is ~10 MiB/ms:
/// 2 s covers ~20 GiB; a bigger victim's reply says "reap pending" (its
/// memory figure is in the follow-up record) but loses nothing else.
pub const REAP_ANSWER_AFTER: Duration = Duration::from_secs(2);

/// Reaps of one victim uid's processes running at once; more wait.
pub const MAX_RUNNING_PER_UID: u32 = 2;

/// Reaps of processes in user namespaces other than the broker's (all such
/// namespaces and uids together) running at once; more wait.
pub const MAX_RUNNING_NAMESPACED: u32 = 8;

/// Reaps running at once, broker-wide: the busy reaper threads.
pub const MAX_RUNNING: u32 = 32;

/// Idle reaper threads kept for the next kill; more exit after
/// [`IDLE_KEEP`] without work.
const IDLE_THREADS: usize = 2;
const IDLE_KEEP: Duration = Duration::from_secs(10);

/// Who a reap is for: to count it against its victim's limits, and to name
/// it in the records written after its kill's outcome.
#[derive(Debug, Clone)]
pub struct ReapOf {
    pub target_pid: i32,
    pub target_uid: u32,
    pub target_comm: String,
    /// The victim is in a user namespace other than the broker's, or that
    /// could not be read (counted as if it were: the smaller budget).
    pub namespaced: bool,
    pub caller_pid: i32,
    pub caller_uid: u32,
}

/// Work for a reaper thread, which comes back unrun when it is not started.
pub trait Work: Send + 'static {
    type Output: Send + 'static;
    fn run(self) -> Self::Output;
    /// Called once if the work must wait for a thread: whatever may not
    /// wait (the SIGKILL of a one-call kill-and-reap) happens here.
    fn before_waiting(&mut self) {}
}

/// Why a reap was not started, and its work back.
#[derive(Debug)]
pub struct Refused<F> {
    pub work: F,
    pub reason: String,
}

/// What a reply says of a reap answered pending (`Ended::Stalled`).
pub fn pending_reason() -> String {
    format!(
        "the reap had not ended after {} s (process_mrelease waits for the victim's mmap lock, which someone else holds); it goes on, and the audit record reap_ended follows when it ends",
        REAP_ANSWER_AFTER.as_secs()
    )
}

/// What a reply says of a reap that panicked (`Ended::Panicked`).
pub const PANICKED_REASON: &str = "the reap failed: a broker bug, reported in its log";

/// The reap outlived its answer bound: it goes on, counted stalled.
#[derive(Debug)]
pub struct Stalled;

type Job = Box<dyn FnOnce() + Send>;
/// Gets a pending reap's result when it ends, `None` if it panicked.
type FollowUp<T> = Box<dyn FnOnce(Option<T>) + Send>;

/// A reap not started yet, in submission order.
struct Waiting {
    of: ReapOf,
    /// Set when its request stopped waiting: never started then.
    given_up: Arc<AtomicBool>,
    job: Job,
}

#[derive(Default)]
struct Pool {
    state: Mutex<State>,
    /// A thread's next job is ready.
    work: Condvar,
}

#[derive(Default)]
struct State {
    /// Reaps waiting for a thread, a queue per victim uid and namespace
    /// flag (so that a big group kill of one uid is one queue, not a scan
    /// of all its members at every reap's end)...
    queues: HashMap<Key, VecDeque<Waiting>>,
    /// ...and those keys, host victims' and namespaced victims' apart, in
    /// the order their first waiting reap came.
    order: [VecDeque<Key>; 2],
    /// Admitted (counted running), for the next idle thread.
    ready: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    running: Counts,
    stalled: Counts,
    /// The stalled reaps themselves, for the shutdown record.
    stalled_reaps: HashMap<u64, (ReapOf, Instant, bool)>,
    next_id: u64,
    /// Wake-ups [`expect`] asked for and no thread has taken yet.
    expected: usize,
}

/// Which queue a waiting reap is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    uid: u32,
    namespaced: bool,
}

/// Reaps by victim uid, in user namespaces, and all together.
#[derive(Default)]
struct Counts {
    by_uid: HashMap<u32, u32>,
    namespaced: u32,
    all: u32,
}

impl Counts {
    fn of_uid(&self, uid: u32) -> u32 {
        self.by_uid.get(&uid).copied().unwrap_or(0)
    }

    fn add(&mut self, of: &ReapOf) {
        *self.by_uid.entry(of.target_uid).or_default() += 1;
        self.namespaced += u32::from(of.namespaced);
        self.all += 1;
    }

    fn remove(&mut self, of: &ReapOf) {
        if let Some(n) = self.by_uid.get_mut(&of.target_uid) {
            *n -= 1;
            if *n == 0 {
                self.by_uid.remove(&of.target_uid);
            }
        }
        self.namespaced -= u32::from(of.namespaced);
        self.all -= 1;
    }
}

/// The limit a reap waits for: what it says, and whether every reap
/// holding it is stalled (then waiting is pointless).
struct Full {
    reason: String,
    all_stalled: bool,
}

impl State {
    /// The first limit keeping `of` from starting now, if any.
    fn full(&self, of: &ReapOf) -> Option<Full> {
        let uid = of.target_uid;
        let running = self.running.of_uid(uid);
        if running >= MAX_RUNNING_PER_UID {
            return Some(Full {
                reason: format!(
                    "{running} reaps of uid {uid}'s processes are running (limit {MAX_RUNNING_PER_UID} per victim uid)"
                ),
                all_stalled: self.stalled.of_uid(uid) >= running,
            });
        }
        if of.namespaced && self.running.namespaced >= MAX_RUNNING_NAMESPACED {
            return Some(Full {
                reason: format!(
                    "{} reaps of processes in other user namespaces are running (limit {MAX_RUNNING_NAMESPACED})",
                    self.running.namespaced
                ),
                all_stalled: self.stalled.namespaced >= self.running.namespaced,
            });
        }
        if self.running.all >= MAX_RUNNING {
            return Some(Full {
                reason: format!(
                    "{} reaps are running broker-wide (limit {MAX_RUNNING})",
                    self.running.all
                ),
                all_stalled: self.stalled.all >= self.running.all,
            });
        }
        None
    }

    /// Drops the given-up reaps at the front of `key`'s queue, and the queue
    /// once empty. Called as each request gives up, so that those of a big
    /// group kill (which give up in submission order) do not stay queued
    /// while stalled reaps keep [`State::schedule`] from reaching them;
    /// one given up behind a live one goes when that one starts.
    fn drop_given_up(&mut self, key: Key) {
        let Some(queue) = self.queues.get_mut(&key) else { return };
        while queue.front().is_some_and(|w| w.given_up.load(Ordering::Acquire)) {
            queue.pop_front();
        }
        if queue.is_empty() {
            self.queues.remove(&key);
            let order = &mut self.order[usize::from(key.namespaced)];
            if let Some(i) = order.iter().position(|k| *k == key) {
                order.remove(i);
            }
        }
    }

    /// Starts every waiting reap no limit holds back, each queue in order,
    /// the queues in the order they came (one uid held back does not hold
    /// back another's), and a thread for each one no idle thread will take.
    /// Visits at most the queues whose uid is at its limit (at most
    /// `MAX_RUNNING / MAX_RUNNING_PER_UID` uids) besides those it starts
    /// reaps from or empties.
    fn schedule(&mut self) {
        'kinds: for namespaced in [false, true] {
            let order = usize::from(namespaced);
            let mut i = 0;
            while i < self.order[order].len() {
                if self.running.all >= MAX_RUNNING {
                    break 'kinds;
                }
                if namespaced && self.running.namespaced >= MAX_RUNNING_NAMESPACED {
                    break;
                }
                let key = self.order[order][i];
                let mut queue = self.queues.remove(&key).unwrap_or_default();
                while let Some(next) = queue.front() {
                    if next.given_up.load(Ordering::Acquire) {
                        queue.pop_front();
                        continue;
                    }
                    if self.full(&next.of).is_some() {
                        break;
                    }
                    let Some(next) = queue.pop_front() else { break };
                    self.running.add(&next.of);
                    self.ready.push_back(next.job);
                }
                if queue.is_empty() {
                    self.order[order].remove(i);
                } else {
                    self.queues.insert(key, queue);
                    i += 1;
                }
            }
        }
        while self.idle < self.ready.len() {
            let spawned = std::thread::Builder::new()
                .name("reapd-reap".into())
                .stack_size(512 << 10)
                .spawn(reaper_thread);
            match spawned {
                // Counted idle until it takes a job.
                Ok(_) => self.idle += 1,
                // The job waits for a thread that ends its reap; its request
                // gives up at its bound (the job then ends unrun).
                Err(err) => {
                    tracing::warn!(error = %err, "no reaper thread could be started");
                    break;
                }
            }
        }
    }
}

static POOL: std::sync::LazyLock<Pool> = std::sync::LazyLock::new(Pool::default);

fn state() -> MutexGuard<'static, State> {
    POOL.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A submitted reap's progress, shared by its job and its request.
enum Slot<W: Work> {
    /// Not started: the work, to take back if the request gives up.
    Waiting(W),
    Running,
    Done(W::Output),
    /// Answered pending: the follow-up gets the result, `id` is its
    /// stalled entry.
    Late(FollowUp<W::Output>, u64),
    /// Given up before it started, or its result taken.
    Gone,
}

impl<W: Work> Slot<W> {
    /// Nothing more to wait for: a result, or a panic's nothing.
    fn finished(&self) -> bool {
        matches!(self, Slot::Done(_) | Slot::Gone)
    }
}

struct Shared<W: Work> {
    slot: Mutex<Slot<W>>,
    /// For a request waiting on a thread (a group kill's).
    done: Condvar,
    /// For a request waiting on the runtime.
    done_async: Notify,
}

impl<W: Work> Shared<W> {
    fn slot(&self) -> MutexGuard<'_, Slot<W>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A submitted reap; [`Reap::wait`] (or [`Reap::wait_blocking`]) for it.
pub struct Reap<W: Work> {
    shared: Arc<Shared<W>>,
    given_up: Arc<AtomicBool>,
    of: ReapOf,
    /// A limit held it back at submission: it waits for a thread.
    queued: bool,
}

/// Submits `work` (a reap) for a reaper thread: started at once if no
/// limit holds it back, otherwise after [`Work::before_waiting`] it waits
/// for one, in order; refused at once (its work back, with the reason)
/// when every reap holding that limit is stalled.
pub fn submit<W: Work>(of: ReapOf, mut work: W) -> Result<Reap<W>, Refused<W>> {
    let mut state = state();
    let full = state.full(&of);
    let queued = full.is_some();
    if let Some(full) = full {
        if full.all_stalled {
            return Err(Refused {
                work,
                reason: format!(
                    "reap skipped: {}, all stalled; killed only, it frees its memory on its own exit path",
                    full.reason
                ),
            });
        }
        work.before_waiting();
    }
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot::Waiting(work)),
        done: Condvar::new(),
        done_async: Notify::new(),
    });
    let given_up = Arc::new(AtomicBool::new(false));
    let job_shared = Arc::clone(&shared);
    let job_of = of.clone();
    let job: Job = Box::new(move || run_job(&job_shared, &job_of));
    let key = Key {
        uid: of.target_uid,
        namespaced: of.namespaced,
    };
    let pool = &mut *state;
    let queue = pool.queues.entry(key).or_default();
    if queue.is_empty() {
        pool.order[usize::from(key.namespaced)].push_back(key);
    }
    queue.push_back(Waiting {
        of: of.clone(),
        given_up: Arc::clone(&given_up),
        job,
    });
    state.schedule();
    drop(state);
    POOL.work.notify_all();
    Ok(Reap {
        shared,
        given_up,
        of,
        queued,
    })
}

/// A reaper thread's run of one job: the work unless its request gave up,
/// its result to the request or the follow-up, and the limits it held
/// released. A panic (reported by the hook) ends this reap, not the thread,
/// and never leaves it counted: the request gets [`Ended::Panicked`], or,
/// answered pending already, the follow-up gets `None`.
fn run_job<W: Work>(shared: &Shared<W>, of: &ReapOf) {
    let work = {
        let mut slot = shared.slot();
        match std::mem::replace(&mut *slot, Slot::Gone) {
            Slot::Waiting(work) => {
                *slot = Slot::Running;
                Some(work)
            }
            other => {
                *slot = other;
                None
            }
        }
    };
    let Some(work) = work else {
        release(of);
        return;
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.run()));
    // The limits first: when its request sees the result, the reap no
    // longer counts (the request's next reap of that uid finds its lane).
    release(of);
    {
        let mut slot = shared.slot();
        match (std::mem::replace(&mut *slot, Slot::Gone), result) {
            (Slot::Running, result) => {
                // A panic leaves it Gone: the request answers at once.
                if let Ok(result) = result {
                    *slot = Slot::Done(result);
                }
                drop(slot);
                shared.done.notify_all();
                shared.done_async.notify_one();
            }
            (Slot::Late(follow_up, id), result) => {
                drop(slot);
                unstall(id);
                follow_up(result.ok());
            }
            (other, _) => *slot = other,
        }
    }
}

/// A reap ended (or never ran): its limits go to the next waiting reaps.
fn release(of: &ReapOf) {
    let mut state = state();
    state.running.remove(of);
    state.schedule();
    drop(state);
    POOL.work.notify_all();
}

impl<W: Work> Reap<W> {
    /// The reap's result if it ends by `deadline`; otherwise, if it never
    /// started, its work back ([`Refused`], the reason names the limit it
    /// waited for); if it started, `Stalled`: it counts as stalled from now
    /// and `follow_up` gets its result when (if ever) it ends (`None`: it
    /// panicked).
    pub async fn wait(
        self,
        deadline: Instant,
        follow_up: impl FnOnce(Option<W::Output>) + Send + 'static,
    ) -> Result<W::Output, Ended<W>> {
        let until = tokio::time::Instant::from_std(deadline);
        loop {
            let notified = self.shared.done_async.notified();
            if self.shared.slot().finished() {
                break;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                break;
            }
        }
        self.end(follow_up)
    }

    /// Waits on this thread, yielding it, for at most `bound`: whether the
    /// reap ended (or panicked). For a reap expected to be shorter than a
    /// thread wake-up: the reaper thread often runs on this CPU (the
    /// scheduler's wake-affine choice) while this one yields, and no wake
    /// of a parked thread is needed for the answer.
    /// A reap that waits for a thread is not spun for.
    pub fn spin_for(&self, bound: Duration) -> bool {
        if self.queued {
            return false;
        }
        let until = Instant::now() + bound;
        loop {
            if self.shared.slot().finished() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// As [`Reap::wait`], blocking this thread (a blocking-pool thread).
    pub fn wait_blocking(
        self,
        deadline: Instant,
        follow_up: impl FnOnce(Option<W::Output>) + Send + 'static,
    ) -> Result<W::Output, Ended<W>> {
        {
            let mut slot = self.shared.slot();
            while !slot.finished() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                slot = self
                    .shared
                    .done
                    .wait_timeout(slot, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        self.end(follow_up)
    }

    /// The request stops waiting: the result, the work of a reap never
    /// started, or the reap counted stalled with its follow-up.
    fn end(self, follow_up: impl FnOnce(Option<W::Output>) + Send + 'static) -> Result<W::Output, Ended<W>> {
        let mut slot = self.shared.slot();
        match std::mem::replace(&mut *slot, Slot::Gone) {
            Slot::Done(result) => Ok(result),
            Slot::Waiting(work) => {
                self.given_up.store(true, Ordering::Release);
                drop(slot);
                let mut state = state();
                state.drop_given_up(Key {
                    uid: self.of.target_uid,
                    namespaced: self.of.namespaced,
                });
                let reason = state
                    .full(&self.of)
                    .map_or_else(|| "no reaper thread could be started".to_owned(), |full| full.reason);
                drop(state);
                Err(Ended::NotStarted(Refused {
                    work,
                    reason: format!(
                        "reap skipped: after {} s {reason}; killed only, it frees its memory on its own exit path",
                        REAP_ANSWER_AFTER.as_secs()
                    ),
                }))
            }
            Slot::Running => {
                let mut state = state();
                let id = state.next_id;
                state.next_id += 1;
                state.stalled.add(&self.of);
                state.stalled_reaps.insert(id, (self.of, Instant::now(), false));
                *slot = Slot::Late(Box::new(follow_up), id);
                Err(Ended::Stalled(Stalled))
            }
            // Its reap panicked: no result, nothing counted.
            Slot::Gone | Slot::Late(..) => Err(Ended::Panicked),
        }
    }
}

/// How a reap ended for its request when it gave no result in time.
#[derive(Debug)]
pub enum Ended<W> {
    /// Never started: no thread within the bound (the reason says which
    /// limit); the work comes back unrun.
    NotStarted(Refused<W>),
    /// Started and still running: answered "pending".
    Stalled(Stalled),
    /// The reap panicked (a broker bug; the panic hook logged it).
    Panicked,
}

fn unstall(id: u64) {
    let mut state = state();
    if let Some((of, _, _)) = state.stalled_reaps.remove(&id) {
        state.stalled.remove(&of);
    }
}

/// Stalled reaps now (answered pending, still running), all victims.
pub fn stalled() -> u32 {
    state().stalled.all
}

/// Reaps running now (on a thread, stalled ones included), all victims.
pub fn running() -> u32 {
    state().running.all
}

/// Reaps waiting for a thread now.
pub fn waiting() -> u32 {
    let state = state();
    state
        .queues
        .values()
        .flatten()
        .filter(|w| !w.given_up.load(Ordering::Acquire))
        .count() as u32
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

/// A small kill was just decided and its reap will be submitted in a few
/// tens of µs (the audit write, the SIGKILL): wakes an idle reaper thread
/// now, which then waits for that job yielding its CPU for at most
/// [`EXPECT_SPIN`] instead of parking. Why: waking a parked thread on an
/// idle vCPU costs 25-35 µs on the VMs measured (issue 17), as much as the
/// reap of a 1 MiB victim; woken early, that wake overlaps the kill's own
/// work. Does nothing when no thread is idle or one is already woken.
pub fn expect() {
    let mut state = state();
    if state.expected > 0 || state.idle <= state.ready.len() {
        return;
    }
    state.expected += 1;
    drop(state);
    POOL.work.notify_one();
}

/// Longest a reaper thread woken by [`expect`] waits for its job on CPU.
const EXPECT_SPIN: Duration = Duration::from_micros(300);

fn reaper_thread() {
    let mut state = state();
    loop {
        if let Some(job) = state.ready.pop_front() {
            state.idle -= 1;
            drop(state);
            job();
            state = self::state();
            state.idle += 1;
            continue;
        }
        if state.expected > 0 {
            state.expected -= 1;
            let until = Instant::now() + EXPECT_SPIN;
            while state.ready.is_empty() && Instant::now() < until {
                drop(state);
                std::thread::yield_now();
                state = self::state();
            }
            continue;
        }
        let (next, timeout) = POOL
            .work
            .wait_timeout(state, IDLE_KEEP)
            .unwrap_or_else(|p| p.into_inner());
        state = next;
        if timeout.timed_out() && state.ready.is_empty() && state.idle > IDLE_THREADS {
            state.idle -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Call<T>(Box<dyn FnOnce() -> T + Send>, Arc<AtomicBool>);

    impl<T: Send + 'static> Work for Call<T> {
        type Output = T;
        fn run(self) -> T {
            (self.0)()
        }
        fn before_waiting(&mut self) {
            self.1.store(true, Ordering::SeqCst);
        }
    }

    impl<T> std::fmt::Debug for Call<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Call")
        }
    }

    fn call<T>(f: impl FnOnce() -> T + Send + 'static) -> Call<T> {
        Call(Box::new(f), Arc::new(AtomicBool::new(false)))
    }

    fn of(uid: u32, namespaced: bool) -> ReapOf {
        ReapOf {
            target_pid: 1,
            target_uid: uid,
            target_comm: String::new(),
            namespaced,
            caller_pid: 1,
            caller_uid: 0,
        }
    }

    /// Reaps gated by a channel: each `release` lets one end.
    struct Gate {
        open: std::sync::mpsc::Sender<()>,
        gate: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    }

    impl Gate {
        fn new() -> Gate {
            let (open, gate) = std::sync::mpsc::channel();
            Gate {
                open,
                gate: Arc::new(Mutex::new(gate)),
            }
        }
        fn held(&self, value: u32) -> Call<u32> {
            let gate = Arc::clone(&self.gate);
            call(move || {
                let _ = gate.lock().unwrap().recv();
                value
            })
        }
        fn release(&self, n: u32) {
            for _ in 0..n {
                self.open.send(()).unwrap();
            }
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(30)
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn until(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// One test, as the pool is one per process: every case in turn, each
    /// leaving nothing running.
    #[test]
    fn reaps_are_bounded_per_uid_namespace_and_broker_and_followed_up() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let gate = Gate::new();
            let uid = 4_000_000_001;

            // In time: the result.
            let quick = submit(of(uid, false), call(|| 7)).ok().unwrap();
            assert_eq!(quick.wait(later(), |_| {}).await.unwrap(), 7);
            // Expected (a thread woken ahead), then submitted: the same.
            expect();
            let quick = submit(of(uid, false), call(|| 6)).ok().unwrap();
            assert_eq!(quick.wait(later(), |_| {}).await.unwrap(), 6);
            // Spun for: ended when the spin returns.
            let quick = submit(of(uid, false), call(|| 8)).ok().unwrap();
            assert!(
                quick.spin_for(Duration::from_secs(5)),
                "a quick reap ended within the spin"
            );
            assert_eq!(quick.wait(Instant::now(), |_| {}).await.unwrap(), 8);

            // A reap's thread releases its count just after its result:
            // every case starts from none running.
            assert!(until(|| running() == 0));
            // Per uid: two run, a third of that uid waits (its
            // before_waiting runs) and starts when one ends; another uid's
            // does not wait.
            let a = submit(of(uid, false), gate.held(1)).ok().unwrap();
            let b = submit(of(uid, false), gate.held(2)).ok().unwrap();
            let third = call(|| 3);
            let waited = Arc::clone(&third.1);
            let c = submit(of(uid, false), third).ok().unwrap();
            assert!(waited.load(Ordering::SeqCst), "before_waiting ran");
            let spun = Instant::now();
            assert!(!c.spin_for(Duration::from_secs(5)), "a queued reap is not spun for");
            assert!(spun.elapsed() < Duration::from_secs(1));
            assert_eq!(waiting(), 1);
            let other = submit(of(uid + 1, false), call(|| 4)).ok().unwrap();
            assert_eq!(other.wait(later(), |_| {}).await.unwrap(), 4);
            gate.release(1);
            assert_eq!(c.wait(later(), |_| {}).await.unwrap(), 3);
            gate.release(1);
            assert_eq!(
                a.wait(later(), |_| {}).await.unwrap() + b.wait(later(), |_| {}).await.unwrap(),
                3
            );
            assert!(until(|| running() == 0));

            // A reap's thread releases its count just after its result:
            // every case starts from none running.
            assert!(until(|| running() == 0));
            // Stalled: answered Stalled, counted, followed up; then a reap of
            // that uid is refused at once (every reap holding its limit is
            // stalled), with its work back.
            let (late_tx, late_rx) = std::sync::mpsc::channel();
            for n in 0..MAX_RUNNING_PER_UID {
                let late = late_tx.clone();
                let reap = submit(of(uid, false), gate.held(10 + n)).ok().unwrap();
                let ended = reap
                    .wait(soon(), move |v: Option<u32>| late.send(v.unwrap()).unwrap())
                    .await;
                assert!(matches!(ended, Err(Ended::Stalled(_))), "{ended:?}");
            }
            assert_eq!(stalled(), MAX_RUNNING_PER_UID);
            let refused = submit(of(uid, false), call(|| 0)).err().expect("refused at once");
            assert!(refused.reason.contains("all stalled"), "{}", refused.reason);
            assert_eq!(refused.work.run(), 0);
            gate.release(MAX_RUNNING_PER_UID);
            let mut ended: Vec<u32> = (0..MAX_RUNNING_PER_UID)
                .map(|_| late_rx.recv_timeout(Duration::from_secs(5)).unwrap())
                .collect();
            ended.sort_unstable();
            assert_eq!(ended, [10, 11]);
            assert!(until(|| stalled() == 0 && running() == 0));

            // A reap's thread releases its count just after its result:
            // every case starts from none running.
            assert!(until(|| running() == 0));
            // A burst of one uid, more than the broker-wide limit: only
            // MAX_RUNNING_PER_UID start; the others wait and, the bound
            // passed, come back unrun. Threads stay bounded.
            let burst: Vec<_> = (0..=MAX_RUNNING)
                .map(|n| submit(of(uid, false), gate.held(n)).ok().unwrap())
                .collect();
            assert_eq!(running(), MAX_RUNNING_PER_UID);
            let deadline = soon();
            let mut not_started = 0;
            for reap in burst {
                match reap.wait(deadline, |_| {}).await {
                    Err(Ended::NotStarted(refused)) => {
                        assert!(refused.reason.contains("per victim uid"), "{}", refused.reason);
                        not_started += 1;
                    }
                    Err(Ended::Stalled(_)) => {}
                    other => panic!("a gated reap ended: {other:?}"),
                }
            }
            assert_eq!(not_started, MAX_RUNNING + 1 - MAX_RUNNING_PER_UID);
            assert_eq!(waiting(), 0);
            // Gone from the queue too, with the two stalled reaps still
            // holding the uid's limit (no schedule reaches them).
            assert!(state().queues.is_empty() && state().order.iter().all(VecDeque::is_empty));
            gate.release(MAX_RUNNING_PER_UID);
            assert!(until(|| stalled() == 0 && running() == 0));

            // A reap's thread releases its count just after its result:
            // every case starts from none running.
            assert!(until(|| running() == 0));
            // Namespaced: many uids, one budget; a reap in the broker's own
            // namespace still starts.
            let held: Vec<_> = (0..MAX_RUNNING_NAMESPACED)
                .map(|n| submit(of(uid + 100 + n, true), gate.held(n)).ok().unwrap())
                .collect();
            let over = submit(of(uid + 200, true), call(|| 0)).ok().unwrap();
            let host = submit(of(uid + 201, false), call(|| 5)).ok().unwrap();
            assert_eq!(host.wait(later(), |_| {}).await.unwrap(), 5);
            match over.wait(soon(), |_| {}).await {
                Err(Ended::NotStarted(refused)) => {
                    assert!(refused.reason.contains("user namespaces"), "{}", refused.reason)
                }
                other => panic!("{other:?}"),
            }
            gate.release(MAX_RUNNING_NAMESPACED);
            for reap in held {
                reap.wait(later(), |_| {}).await.unwrap();
            }

            // A reap's thread releases its count just after its result:
            // every case starts from none running.
            assert!(until(|| running() == 0));
            // Broker-wide: MAX_RUNNING uids, one reap each; the next waits,
            // and once they are stalled is refused at once.
            let held: Vec<_> = (0..MAX_RUNNING)
                .map(|n| submit(of(uid + 300 + n, false), gate.held(n)).ok().unwrap())
                .collect();
            let (late_tx, late_rx) = std::sync::mpsc::channel();
            let deadline = soon();
            for reap in held {
                let late = late_tx.clone();
                assert!(matches!(
                    reap.wait(deadline, move |v: Option<u32>| late.send(v.unwrap()).unwrap())
                        .await,
                    Err(Ended::Stalled(_))
                ));
            }
            let refused = submit(of(uid + 400, false), call(|| 0)).err().expect("refused at once");
            assert!(refused.reason.contains("broker-wide"), "{}", refused.reason);
            gate.release(MAX_RUNNING);
            for _ in 0..MAX_RUNNING {
                late_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            }
            assert!(until(|| stalled() == 0 && running() == 0));

            // From a blocking thread (a group kill): the same.
            let reap = submit(of(uid, false), call(|| 9)).ok().unwrap();
            let got = std::thread::spawn(move || reap.wait_blocking(later(), |_| {}).unwrap())
                .join()
                .unwrap();
            assert_eq!(got, 9);

            // A panicking reap is answered, counted nowhere, and the thread
            // goes on.
            let reap = submit(of(uid, false), call(|| -> u32 { panic!("test panic") }))
                .ok()
                .unwrap();
            let asked = Instant::now();
            assert!(matches!(reap.wait(later(), |_| {}).await, Err(Ended::Panicked)));
            assert!(asked.elapsed() < Duration::from_secs(5), "answered when it panicked");
            assert!(until(|| stalled() == 0 && running() == 0));
            let reap = submit(of(uid, false), call(|| 11)).ok().unwrap();
            assert_eq!(reap.wait(later(), |_| {}).await.unwrap(), 11);
            // One panicking after it was answered pending: its follow-up
            // still comes (None), and nothing stays counted.
            let gate_rx = Arc::clone(&gate.gate);
            let reap = submit(
                of(uid, false),
                call(move || -> u32 {
                    let _ = gate_rx.lock().unwrap().recv();
                    panic!("test panic after pending")
                }),
            )
            .ok()
            .unwrap();
            let (late_tx, late_rx) = std::sync::mpsc::channel();
            let ended = reap.wait(soon(), move |v: Option<u32>| late_tx.send(v).unwrap()).await;
            assert!(matches!(ended, Err(Ended::Stalled(_))), "{ended:?}");
            gate.release(1);
            assert_eq!(late_rx.recv_timeout(Duration::from_secs(5)).unwrap(), None);
            assert!(until(|| stalled() == 0 && running() == 0));

            // A big group of one uid (a fork bomb's cgroup): one queue, so
            // each reap's end does not scan every member still waiting.
            const MEMBERS: u32 = 20_000;
            let started = Instant::now();
            let reaps: Vec<_> = (0..MEMBERS)
                .map(|n| submit(of(uid, false), call(move || n)).ok().unwrap())
                .collect();
            let mut sum = 0u64;
            for reap in reaps {
                sum += u64::from(reap.wait(later(), |_| {}).await.unwrap());
            }
            assert_eq!(sum, u64::from(MEMBERS) * u64::from(MEMBERS - 1) / 2);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(5),
                "{MEMBERS} reaps of one uid took {took:?}"
            );
            assert!(until(|| running() == 0 && waiting() == 0));
        });
    }
}
