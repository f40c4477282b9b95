// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the broker costs: per-call latency against the same syscalls made
//! in-process, CheckPermission throughput by concurrency, footprint, and
//! idle connections against RSS.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reapd_client::{Client, Target};
use rustix::process::{Pid, PidfdFlags, Signal};
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::probe::FreezerCgroup;
use crate::stats::{summarize, Summary};
use crate::victim::{Memory, Victim, VICTIM_UID};

/// Tiny victims for the per-call kill latency: 1 MiB.
pub const TINY: usize = 1 << 20;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CheckPermission over gRPC, one connection, sequential calls.
pub async fn check_grpc(socket: &Path, target: Target, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut client = Client::connect(socket).await?;
    for _ in 0..(n / 10).max(10) {
        client.check_permission(target.clone()).await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        client.check_permission(target.clone()).await?;
        out.push(us(t0.elapsed()));
    }
    Ok(out)
}

/// CheckPermission over varlink, one connection, sequential calls.
pub fn check_varlink(socket: &Path, target: Target, n: usize) -> anyhow::Result<Vec<f64>> {
    use reapd_client::varlink::Client as VClient;
    let mut client = VClient::connect(socket)?;
    for _ in 0..(n / 10).max(10) {
        client.check_permission(target.clone())?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        client.check_permission(target.clone())?;
        out.push(us(t0.elapsed()));
    }
    Ok(out)
}

/// A policy of `rules` rules shaped like per-team grants (each naming a
/// distinct caller uid, a target uid range and a cgroup), plus the kill(2)
/// rule so the benchmark's root caller is still answered "allowed". The
/// shape follows broker/benches/policy.rs.
pub fn policy_text(rules: usize) -> String {
    let mut text = String::from(
        "[defaults]\nkill-rule = true\n\n[[rule]]\nname = \"nobody-kills-root\"\neffect = \"deny\"\nactions = [\"kill-and-reap\"]\ncaller.any = true\ntarget.uids = [0]\n\n",
    );
    for i in 0..rules.saturating_sub(1) {
        text.push_str(&format!(
            "[[rule]]\nname = \"team-{i}\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [{}]\ntarget.uids = [\"{}-{}\"]\ntarget.cgroups = [\"team.slice/team-{i}.slice\"]\n\n",
            100_000 + i,
            200_000 + i * 10,
            200_000 + i * 10 + 9
        ));
    }
    text
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyPoint {
    pub rules: usize,
    pub start_ms: f64,
    pub check_us: Summary,
}

/// CheckPermission latency (gRPC, sequential) on a broker loaded with a
/// policy of each size.
pub async fn policy_cost(
    reapd: &Path,
    dir: &Path,
    target: Target,
    sizes: &[usize],
    n: usize,
) -> anyhow::Result<Vec<PolicyPoint>> {
    let mut out = Vec::new();
    for &rules in sizes {
        let file = dir.join(format!("policy-{rules}.toml"));
        std::fs::write(&file, policy_text(rules))?;
        let args = vec!["--policy".to_string(), file.display().to_string()];
        let broker = Broker::start(reapd, dir, &format!("policy{rules}"), &args).await?;
        let lat = check_grpc(&broker.socket, target.clone(), n).await?;
        let p = PolicyPoint {
            rules,
            start_ms: broker.start_to_first_reply.as_secs_f64() * 1e3,
            check_us: summarize(&lat),
        };
        eprintln!("policy: {rules} rules: CheckPermission p50 {:.0} µs", p.check_us.p50);
        out.push(p);
    }
    Ok(out)
}

/// What a privileged caller does in-process to answer the same question:
/// open a pidfd (pins the process) and read its credentials from /proc.
pub fn check_inprocess(pid: i32, n: usize) -> anyhow::Result<Vec<f64>> {
    let p = Pid::from_raw(pid).ok_or_else(|| anyhow::anyhow!("bad pid"))?;
    let path = format!("/proc/{pid}/status");
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        let fd = rustix::process::pidfd_open(p, PidfdFlags::empty())?;
        let status = std::fs::read_to_string(&path)?;
        std::hint::black_box((&fd, status.len()));
        drop(fd);
        if i >= n / 10 {
            out.push(us(t0.elapsed()));
        }
    }
    Ok(out)
}

/// `n` tiny victims of `uid`, spawned (and, with a `freezer`, frozen)
/// outside any timed window. Frozen victims cannot run their exit path
/// once killed, so the reap does all the work, as for a frozen container:
/// the comparison is then the kill and reap alone, with no race against
/// the victim's own exit.
fn tiny_victims(n: usize, uid: u32, freezer: Option<&FreezerCgroup>) -> anyhow::Result<Vec<Victim>> {
    let victims: Vec<Victim> = (0..n)
        .map(|_| Victim::spawn(&Memory::Anon(TINY), Some(uid)))
        .collect::<anyhow::Result<_>>()?;
    if let Some(f) = freezer {
        for v in &victims {
            f.freeze(v.pid)?;
        }
    }
    Ok(victims)
}

/// Thaws (so killed victims can exit) and waits for every victim.
fn finish_victims(victims: Vec<Victim>, freezer: Option<&FreezerCgroup>) {
    if let Some(f) = freezer {
        let _ = f.thaw();
    }
    victims.into_iter().for_each(Victim::finish);
}

/// Kill + reap of tiny victims in-process, doing what the broker must do
/// for a kill: pidfd_open, PIDFD_GET_INFO and one read() each of the
/// target's status (its memory before the kill), stat, oom_score_adj and
/// cgroup (the pin and the decision's facts), then pidfd_send_signal
/// (SIGKILL) and process_mrelease. Victims spawned (and frozen, with a
/// `freezer`) in batches outside the window.
pub fn kill_inprocess(n: usize, freezer: Option<&FreezerCgroup>) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(64);
        let victims = tiny_victims(batch, VICTIM_UID, freezer)?;
        for v in &victims {
            let paths = ["status", "stat", "oom_score_adj", "cgroup"].map(|f| format!("/proc/{}/{f}", v.pid));
            let t0 = Instant::now();
            let pid = Pid::from_raw(v.pid).ok_or_else(|| anyhow::anyhow!("bad pid"))?;
            let fd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
            let wanted = reapd::os::sys::PIDFD_INFO_CREDS | reapd::os::sys::PIDFD_INFO_PID;
            std::hint::black_box(reapd::os::sys::pidfd_get_info(fd.as_fd(), wanted).is_ok());
            for path in &paths {
                crate::floor::read_once(path)?;
            }
            rustix::process::pidfd_send_signal(&fd, Signal::KILL)?;
            crate::memback::mrelease_retrying(fd.as_fd())?;
            out.push(us(t0.elapsed()));
        }
        finish_victims(victims, freezer);
    }
    Ok(out)
}

/// KillAndReap of tiny victims over gRPC (or varlink). The broker
/// rate-limits kills per caller uid (burst 64, then 20/s), so the calls
/// come from `workers` unprivileged worker processes with their own uids,
/// each killing its own victims within its burst: this measures the call,
/// not the limiter. `uid_base` keeps each transport's workers on uids of
/// their own, so every worker starts with a full bucket. Victims are
/// spawned here (not by the worker: the killer is not their parent) and,
/// with a `freezer`, frozen.
pub fn kill_grpc(
    socket: &Path,
    workers: usize,
    per_worker: usize,
    varlink: bool,
    uid_base: u32,
    freezer: Option<&FreezerCgroup>,
) -> anyhow::Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for w in 0..workers {
        let uid = uid_base + w as u32;
        let victims = tiny_victims(per_worker, uid, freezer)?;
        let pids: Vec<String> = victims.iter().map(|v| v.pid.to_string()).collect();
        let mut cmd = Command::new(&exe);
        cmd.arg("worker-kill")
            .arg("--socket")
            .arg(socket)
            .arg("--pids")
            .arg(pids.join(","));
        if varlink {
            cmd.arg("--varlink");
        }
        let output = cmd
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        finish_victims(victims, freezer);
        let output = output?;
        if !output.status.success() {
            anyhow::bail!("kill worker as uid {uid} failed: {}", output.status);
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            out.push(line.trim().parse::<f64>()?);
        }
    }
    Ok(out)
}

/// The `worker-kill` mode, run as an unprivileged uid: KillAndReap each of
/// `pids` (victims of this uid) through the broker, printing each call's
/// latency in microseconds.
pub fn worker_kill_main(socket: &Path, pids: &[i32], varlink: bool) -> anyhow::Result<()> {
    let targets: Vec<Target> = pids.iter().map(|&pid| Target::pinned(pid)).collect::<Result<_, _>>()?;
    let mut lines = String::new();
    if varlink {
        let mut client = reapd_client::varlink::Client::connect(socket)?;
        client.capabilities()?;
        for target in targets {
            let t0 = Instant::now();
            client.kill_and_reap(target, None)?;
            lines.push_str(&format!("{}\n", us(t0.elapsed())));
        }
        print!("{lines}");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut client = Client::connect(socket).await?;
        client.capabilities().await?;
        for target in targets {
            let pid = target.pid;
            let t0 = Instant::now();
            let report = client.kill_and_reap(target, None).await?;
            let took = us(t0.elapsed());
            if report.outcome == reapd_client::Outcome::Unspecified {
                anyhow::bail!("KillAndReap of {pid} answered no outcome");
            }
            lines.push_str(&format!("{took}\n"));
        }
        anyhow::Ok(())
    })?;
    print!("{lines}");
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConcurrencyPoint {
    pub clients: usize,
    pub calls_per_sec: f64,
    pub latency_us: Summary,
}

/// CheckPermission throughput with `clients` connections each calling in a
/// closed loop for `duration`.
pub async fn throughput(
    socket: &Path,
    target: Target,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<ConcurrencyPoint> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = Client::connect(socket).await?;
        c.check_permission(target.clone()).await?;
        conns.push(c);
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for mut c in conns {
        let start = start.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let deadline = Instant::now() + duration;
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                c.check_permission(target.clone()).await?;
                lat.push(us(t0.elapsed()));
            }
            anyhow::Ok(lat)
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Ok(ConcurrencyPoint {
        clients,
        calls_per_sec: all.len() as f64 / elapsed,
        latency_us: summarize(&all),
    })
}

/// Makes `total` CheckPermission calls over `clients` connections.
pub async fn many_calls(socket: &Path, target: Target, total: usize, clients: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let socket = socket.to_path_buf();
        let n = total / clients + usize::from(i < total % clients);
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&socket).await?;
            for _ in 0..n {
                c.check_permission(target.clone()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalePoint {
    pub connections: usize,
    pub rss_bytes: u64,
}

/// Opens real gRPC connections (each answered one call, then idle) up to
/// each step, reading the broker's RSS at each. Stops early (with a note)
/// if a connection is not answered within 10 s, e.g. at the broker's fd
/// limit.
pub async fn idle_connections(
    broker: &Broker,
    steps: &[usize],
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<ScalePoint>> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    'steps: for &step in steps {
        while held.len() < step {
            let open = async {
                let mut c = Client::connect(&broker.socket).await?;
                c.capabilities().await?;
                anyhow::Ok(c)
            };
            match tokio::time::timeout(Duration::from_secs(10), open).await {
                Ok(Ok(c)) => held.push(c),
                Ok(Err(e)) => {
                    notes.push(format!(
                        "scale: connection {} failed ({e}); stopped there",
                        held.len() + 1
                    ));
                    break 'steps;
                }
                Err(_) => {
                    notes.push(format!(
                        "scale: connection {} was not answered within 10 s; stopped there",
                        held.len() + 1
                    ));
                    break 'steps;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        out.push(ScalePoint {
            connections: step,
            rss_bytes: broker.rss(),
        });
        eprintln!("scale: {step} idle connections, broker RSS {} KiB", broker.rss() / 1024);
    }
    Ok(out)
}
