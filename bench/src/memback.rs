// SPDX-License-Identifier: MIT OR Apache-2.0
//! Memory back: how long after the first syscall of each method the
//! machine has the victim's memory again, per victim size and state.

use std::os::fd::AsFd;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reapd_client::{Client, Target};
use rustix::process::{Pid, PidfdFlags, Signal};
use serde::{Deserialize, Serialize};

use crate::probe::{status_bytes, FreezerCgroup, MemSampler};
use crate::victim::{Memory, Spinners, Victim, VICTIM_UID};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum State {
    Running,
    Starved,
    Frozen,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Starved => "starved",
            State::Frozen => "frozen",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    /// kill(2) then waitpid: what earlyoom and systemd-oomd do.
    KillWait,
    /// pidfd_send_signal + process_mrelease made by a privileged caller
    /// in-process: the physical limit.
    InProcess,
    /// KillAndReap through the broker over gRPC.
    Grpc,
    /// KillAndReap through the broker over varlink.
    Varlink,
}

impl Method {
    pub fn short(self) -> &'static str {
        match self {
            Method::KillWait => "kill+wait",
            Method::InProcess => "in-process",
            Method::Grpc => "reapd gRPC",
            Method::Varlink => "reapd varlink",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub size: String,
    pub state: State,
    pub method: Method,
    pub rss_bytes: u64,
    /// Milliseconds until 95% of the victim's RSS was available again;
    /// None when it did not happen within the timeout.
    pub back_ms: Option<f64>,
    /// Milliseconds until the method's call(s) returned.
    pub call_ms: f64,
    pub error: Option<String>,
}

pub struct Config {
    pub sizes: Vec<(String, Memory)>,
    pub states: Vec<State>,
    pub methods: Vec<Method>,
    pub reps: usize,
    pub timeout: Duration,
    pub cpus: usize,
}

pub struct Ctx<'a> {
    pub rt: &'a tokio::runtime::Runtime,
    pub client: Client,
    pub varlink: std::path::PathBuf,
    pub sampler: MemSampler,
    pub freezer: Option<FreezerCgroup>,
}

/// Runs every (state, size) block with the methods alternating within it:
/// rep r starts with method r mod n, so drift falls on all alike.
pub fn run(cfg: &Config, ctx: &mut Ctx<'_>) -> anyhow::Result<Vec<Trial>> {
    let mut trials = Vec::new();
    for &state in &cfg.states {
        if state == State::Frozen && ctx.freezer.is_none() {
            eprintln!("memory back: no v1 freezer, skipping the frozen state");
            continue;
        }
        for (label, memory) in &cfg.sizes {
            for rep in 0..cfg.reps {
                for i in 0..cfg.methods.len() {
                    let method = cfg.methods[(i + rep) % cfg.methods.len()];
                    let trial = one(cfg, ctx, label, memory, state, method)?;
                    eprintln!(
                        "memory back: {state:?} {label} {method:?} rep {rep}: back {} call {:.1} ms{}",
                        trial.back_ms.map_or("timeout".to_string(), |b| format!("{b:.1} ms")),
                        trial.call_ms,
                        trial
                            .error
                            .as_deref()
                            .map(|e| format!(" error: {e}"))
                            .unwrap_or_default()
                    );
                    trials.push(trial);
                }
            }
        }
    }
    Ok(trials)
}

fn in_process_kill(pid: i32) -> anyhow::Result<()> {
    let pid = Pid::from_raw(pid).ok_or_else(|| anyhow::anyhow!("bad pid"))?;
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL)?;
    mrelease_retrying(pidfd.as_fd())
}

/// process_mrelease, retried while it reports transient contention
/// (EAGAIN/EINTR); a victim already gone (ESRCH) needs no reaping.
pub fn mrelease_retrying(pidfd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()> {
    for _ in 0..1000 {
        match crate::sys::process_mrelease(pidfd) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("process_mrelease kept failing with EAGAIN")
}

/// The victim's resident anonymous and shmem bytes; 0 once it has no
/// address space (a zombie's status has no Rss lines) or is gone.
fn victim_holds(pid: i32) -> u64 {
    status_bytes(pid, "RssAnon").unwrap_or(0) + status_bytes(pid, "RssShmem").unwrap_or(0)
}

fn one(
    cfg: &Config,
    ctx: &mut Ctx<'_>,
    label: &str,
    memory: &Memory,
    state: State,
    method: Method,
) -> anyhow::Result<Trial> {
    let victim = Victim::spawn(memory, Some(VICTIM_UID))?;
    let pid = victim.pid;
    let rss = status_bytes(pid, "RssAnon")? + status_bytes(pid, "RssShmem").unwrap_or(0);
    let mut spinners = None;
    match state {
        State::Running => {}
        State::Starved => {
            crate::sys::set_sched_idle(pid)?;
            spinners = Some(Spinners::start(cfg.cpus)?);
            // Let the spinners take the cores before the window opens.
            std::thread::sleep(Duration::from_millis(100));
        }
        State::Frozen => {
            if let Some(f) = &ctx.freezer {
                f.freeze(pid)?;
            }
        }
    }
    let target = Target::pinned(pid)?;
    let Victim { child, .. } = victim;
    let handle = ctx.rt.handle().clone();
    let mut client = ctx.client.clone();
    // A fresh varlink connection per trial, opened outside the window (the
    // gRPC client reuses one channel; both are connected before t0).
    let mut vclient = match method {
        Method::Varlink => Some(reapd_client::varlink::Client::connect(&ctx.varlink)?),
        _ => None,
    };

    let baseline = ctx.sampler.available()?;
    let goal = baseline + rss / 100 * 95;
    let (tx, rx) = mpsc::channel::<Instant>();
    let worker = std::thread::spawn(move || -> (Child, Duration, Option<String>) {
        let mut child = child;
        let t0 = Instant::now();
        let _ = tx.send(t0);
        let result: anyhow::Result<()> = match method {
            Method::KillWait => child.kill().and_then(|_| child.wait()).map(|_| ()).map_err(Into::into),
            Method::InProcess => in_process_kill(pid),
            Method::Grpc => handle
                .block_on(client.kill_and_reap(target, None))
                .map(|_| ())
                .map_err(Into::into),
            Method::Varlink => match vclient.as_mut() {
                Some(v) => v.kill_and_reap(target.clone(), None).map(|_| ()).map_err(Into::into),
                None => Err(anyhow::anyhow!("no varlink connection")),
            },
        };
        (child, t0.elapsed(), result.err().map(|e| e.to_string()))
    });
    let t0 = rx.recv()?;
    let mut back = None;
    loop {
        let now_avail = ctx.sampler.available()?;
        let elapsed = t0.elapsed();
        // Both the machine has the memory and the victim no longer holds
        // it: on a busy machine another process freeing memory could
        // otherwise pass for the victim's.
        if now_avail >= goal && victim_holds(pid) <= rss / 20 {
            back = Some(elapsed);
            break;
        }
        if elapsed > cfg.timeout {
            break;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    // Release the state so every victim dies and the worker returns.
    if state == State::Frozen {
        if let Some(f) = &ctx.freezer {
            f.thaw()?;
        }
    }
    drop(spinners.take());
    let (mut child, call, error) = worker.join().map_err(|_| anyhow::anyhow!("method thread panicked"))?;
    let _ = child.kill();
    let _ = child.wait();
    // Let the machine settle: the memory back (it is, once the victim is
    // gone) and a short pause so the next trial starts from quiet.
    let settle = Instant::now();
    while ctx.sampler.available()? < goal && settle.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(150));
    Ok(Trial {
        size: label.to_string(),
        state,
        method,
        rss_bytes: rss,
        back_ms: back.map(|d| d.as_secs_f64() * 1e3),
        call_ms: call.as_secs_f64() * 1e3,
        error,
    })
}
