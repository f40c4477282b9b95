//! The floor: what any broker on these transports and this kernel must
//! cost, measured in the same run as reapd, so reapd is judged by its cost
//! *above* the floor rather than by absolute times on a noisy machine.
//!
//! - *tonic echo*: a bare tonic server of the same `reapd.v1.Reaper`
//!   service (same tonic, prost and tokio as Cargo.lock, same 2 worker
//!   threads) whose CheckPermission answers a fixed reply at once, reached
//!   by the same `reapd-client` blocking client.
//! - *JSON echo*: a bare NUL-delimited JSON server on a Unix socket (the
//!   varlink floor): parse the request, answer a fixed reply, reached by
//!   the same `reapd_client::varlink` client.
//! - *in-process*: the syscalls the broker must make for one
//!   CheckPermission, done by this process: pidfd_open of the target,
//!   PIDFD_GET_INFO (credentials, tgid) or /proc/PID/status where that
//!   ioctl is missing, /proc/PID/stat (start time, comm, kernel-thread
//!   flag), /proc/PID/oom_score_adj, /proc/PID/cgroup (one read() each),
//!   and a poll of the pidfd to re-validate. Caller identification happens
//!   once per connection at accept, not per call, so it is not in the
//!   per-call floor. For a kill: pidfd_open, pidfd_send_signal(SIGKILL),
//!   process_mrelease.
//! - *joint floors*: the same two echoes making the in-process check's
//!   syscalls on the requested target before answering a CheckPermission.
//!   On this 2-vCPU VM the floor and the syscalls do not add up: a server
//!   that works ~10 µs or more per call no longer shares a CPU with its
//!   sequential client, and each hand-off then wakes an idle vCPU
//!   (25-50 µs), while the bare echo answers fast enough to escape both
//!   (the blocking gRPC client is woken once when the server reads the
//!   request, for socket write space, and an echo's reply lands while that
//!   vCPU is still awake). The joint floor pays what any broker doing the
//!   work would pay, so reapd's cost above it is what reapd adds.
//!
//! Every path is measured warm (back-to-back calls on one connection) and
//! after 100 ms idle gaps, interleaved, with repetitions.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reapd_client::{blocking, Target};
use reapd_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::stats::{median_ci, summarize, Median, Summary};
use crate::victim::{Memory, Victim, VICTIM_UID};

/// Idle gap before each "after idle" call.
pub const IDLE_GAP: Duration = Duration::from_millis(100);

/// Warm and after-idle latency of one path, µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pair {
    pub warm: Summary,
    pub idle: Summary,
}

/// What one server process costs per call, beyond latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cost {
    /// On-CPU time of all the server's threads per call, µs
    /// (/proc/PID/task/*/schedstat).
    pub cpu_us: f64,
    /// Syscalls per call (strace -c -f on every thread); `None` without strace.
    pub syscalls: Option<f64>,
    /// Instructions per call (valgrind --tool=callgrind); `None` if not run.
    pub instructions: Option<f64>,
}

/// One server (a floor or a reapd binary) on one transport.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Transport {
    pub check: Pair,
    pub cost: Cost,
    /// Closed-loop CheckPermission calls per second, by client count.
    pub throughput: Vec<(usize, f64)>,
    /// Latency at a fixed arrival rate, µs from the scheduled send.
    pub fixed_rate: Summary,
    /// The same at [`FloorResults::busy_rate_per_sec`], a rate that keeps
    /// the CPUs awake between calls.
    #[serde(default)]
    pub fixed_rate_busy: Option<Summary>,
    /// A broker's own cost after an idle gap, µs: the median over the
    /// idle rounds of (this call − the floor's − the in-process
    /// syscalls'), all three made in the same round, so the VM's drift
    /// between rounds cancels; with its 95 % interval. `None` for floors.
    #[serde(default)]
    pub idle_own: Option<Median>,
    /// The same against the joint floor (this call − the joint floor's,
    /// paired by round). `None` for floors and older results.
    #[serde(default)]
    pub idle_own_joint: Option<Median>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Server {
    pub label: String,
    pub grpc: Transport,
    pub varlink: Transport,
    /// KillAndReap of a 1 MiB victim, µs (for the echoes: their answer, the floor).
    pub kill_grpc: Option<Summary>,
    pub kill_varlink: Option<Summary>,
    pub threads_idle: u64,
    pub threads_after: u64,
    pub rss_idle: u64,
    pub rss_after: u64,
    /// After [`SETTLE`] with no calls: what the server gave back.
    #[serde(default)]
    pub threads_settled: u64,
    #[serde(default)]
    pub rss_settled: u64,
    /// The anonymous part of the RSS (RssAnon), idle and settled; the rest
    /// is file-backed (the binary's text and the C library, shared).
    #[serde(default)]
    pub anon_idle: u64,
    #[serde(default)]
    pub anon_settled: u64,
    /// RSS and RssAnon at the end of the whole run, [`SETTLE`] after its
    /// last call.
    #[serde(default)]
    pub rss_end: u64,
    #[serde(default)]
    pub anon_end: u64,
    pub calls_before_after: usize,
    pub binary_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FloorResults {
    pub quick: bool,
    pub reps: usize,
    pub warm_calls: usize,
    pub idle_calls: usize,
    pub rate_per_sec: f64,
    #[serde(default)]
    pub busy_rate_per_sec: f64,
    pub inprocess_check: Pair,
    /// The joint floors (the echoes making the in-process syscalls, see the
    /// module docs), gRPC and varlink; `None` in older results.
    #[serde(default)]
    pub joint_grpc: Option<Pair>,
    #[serde(default)]
    pub joint_varlink: Option<Pair>,
    pub inprocess_syscalls: f64,
    /// Instructions per in-process check (callgrind); `None` if not run.
    #[serde(default)]
    pub inprocess_instructions: Option<f64>,
    /// How the instructions were counted, for the table note.
    #[serde(default)]
    pub callgrind: Option<CallgrindRun>,
    pub inprocess_kill: Summary,
    /// The KillAndReap victims were frozen (v1 freezer), not running.
    #[serde(default)]
    pub kill_frozen: bool,
    /// KillAndReap calls each kill worker makes in a row.
    #[serde(default)]
    pub kills_per_caller: usize,
    /// The bare echo servers first, then each broker.
    pub servers: Vec<Server>,
    pub notes: Vec<String>,
}

/// How the instructions per call were counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallgrindRun {
    /// `valgrind --version`.
    pub version: String,
    /// Calls on each connection before the measured ones, in every run.
    pub warm: usize,
    /// Measured calls per run.
    pub calls: usize,
    /// Syscalls valgrind reported as unhandled in any run: (number, name).
    pub unhandled: Vec<(u32, String)>,
}

pub struct Config {
    pub quick: bool,
    pub reps: usize,
    pub warm_calls: usize,
    pub idle_calls: usize,
    pub clients: Vec<usize>,
    pub tput_duration: Duration,
    pub rate_per_sec: f64,
    pub busy_rate_per_sec: f64,
    pub rate_duration: Duration,
    pub cost_calls: usize,
    pub soak_calls: usize,
    pub kills: (usize, usize),
    /// Callgrind's warm-up and measured calls per run (see [`Callgrind`]).
    pub callgrind: Option<(usize, usize)>,
}

impl Config {
    pub fn new(quick: bool) -> Config {
        if quick {
            Config {
                quick,
                reps: 1,
                warm_calls: 200,
                idle_calls: 2,
                clients: vec![1, 4],
                tput_duration: Duration::from_millis(200),
                rate_per_sec: 500.0,
                busy_rate_per_sec: 2000.0,
                rate_duration: Duration::from_millis(200),
                cost_calls: 200,
                soak_calls: 500,
                kills: (1, 3),
                callgrind: Some((5, 50)),
            }
        } else {
            Config {
                quick,
                reps: 3,
                warm_calls: 3000,
                idle_calls: 50,
                clients: vec![1, 64],
                tput_duration: Duration::from_secs(2),
                rate_per_sec: 1000.0,
                busy_rate_per_sec: 4000.0,
                rate_duration: Duration::from_secs(3),
                cost_calls: 2000,
                soak_calls: 100_000,
                kills: (4, 40),
                callgrind: Some((20, 1000)),
            }
        }
    }
}

/// The floor servers run in a process of their own (like the broker), so
/// the client's and server's runtimes never share threads.
pub struct FloorServer {
    child: Child,
    pub grpc: PathBuf,
    pub varlink: PathBuf,
}

impl FloorServer {
    /// Starts the bare echoes, or with `syscalls` the joint floor (see
    /// the module docs).
    pub fn start(dir: &Path, syscalls: bool) -> anyhow::Result<FloorServer> {
        let name = if syscalls { "floor-syscalls" } else { "floor" };
        let grpc = dir.join(format!("{name}.sock"));
        let varlink = dir.join(format!("{name}.varlink"));
        let mut args = FloorServer::args(&grpc, &varlink);
        if syscalls {
            args.push("--syscalls".into());
        }
        let child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut server = FloorServer { child, grpc, varlink };
        // It prints one line once both sockets listen.
        let mut line = String::new();
        let stdout = server.child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            anyhow::bail!("floor server did not start: {line:?}");
        }
        Ok(server)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The arguments of `reapd-bench` that start one.
    fn args(grpc: &Path, varlink: &Path) -> Vec<OsString> {
        vec![
            "floor-server".into(),
            "--grpc".into(),
            grpc.into(),
            "--varlink".into(),
            varlink.into(),
        ]
    }
}

/// The arguments of a broker run under valgrind: as `Broker::start` runs
/// it, without the broker's seccomp filter, which valgrind cannot pass on
/// (it does not know seccomp(2)) and which would forbid valgrind's own
/// syscalls.
fn broker_args(dir: &Path, grpc: &Path, varlink: &Path) -> anyhow::Result<Vec<OsString>> {
    let policy = crate::broker::default_policy(dir, "callgrind")?;
    Ok(vec![
        "--grpc-socket".into(),
        grpc.into(),
        "--varlink-socket".into(),
        varlink.into(),
        "--policy".into(),
        policy.into(),
        "--no-seccomp".into(),
    ])
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bare tonic service: every CheckPermission answered at once with a
/// reply shaped like reapd's (with `syscalls`, after the in-process
/// check's syscalls on its target).
struct Echo {
    syscalls: bool,
}

/// The joint floor's work for one CheckPermission of `pid`: the in-process
/// check, paths included (the broker builds them per call too).
fn joint_check(pid: i32) -> anyhow::Result<()> {
    let paths = ["status", "stat", "oom_score_adj", "cgroup"].map(|f| format!("/proc/{pid}/{f}"));
    inprocess_check_once(pid, &paths)
}

#[tonic::async_trait]
impl pb::reaper_server::Reaper for Echo {
    async fn kill_and_reap(
        &self,
        request: tonic::Request<pb::KillAndReapRequest>,
    ) -> Result<tonic::Response<pb::KillAndReapResponse>, tonic::Status> {
        let target = request.into_inner().target.unwrap_or_default();
        Ok(tonic::Response::new(
            echo_kill_report(target.pid, target.start_time.unwrap_or_default()).into(),
        ))
    }
    async fn check_permission(
        &self,
        request: tonic::Request<pb::CheckPermissionRequest>,
    ) -> Result<tonic::Response<pb::CheckPermissionResponse>, tonic::Status> {
        let target = request.into_inner().target.unwrap_or_default();
        if self.syscalls {
            joint_check(target.pid).map_err(|e| tonic::Status::internal(format!("{e:#}")))?;
        }
        Ok(tonic::Response::new(pb::CheckPermissionResponse {
            allowed: true,
            reason: "kill(2) allows it: same uid".into(),
            target: Some(pb::ProcessInfo {
                pid: target.pid,
                uid: VICTIM_UID,
                euid: VICTIM_UID,
                suid: VICTIM_UID,
                gid: VICTIM_UID,
                comm: "reapd-bench".into(),
                start_time: target.start_time.unwrap_or_default(),
                cgroup: "/user.slice/user-0.slice/session-1.scope".into(),
            }),
            kind: pb::DecisionKind::Allowed as i32,
            rule: "kill(2)".into(),
        }))
    }
    async fn get_capabilities(
        &self,
        _: tonic::Request<pb::GetCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::GetCapabilitiesResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::GetCapabilitiesResponse::default()))
    }
    async fn kill_cgroup(
        &self,
        _: tonic::Request<pb::KillCgroupRequest>,
    ) -> Result<tonic::Response<pb::KillCgroupResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn list_candidates(
        &self,
        _: tonic::Request<pb::ListCandidatesRequest>,
    ) -> Result<tonic::Response<pb::ListCandidatesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    type WatchKillsStream = reapd::transport::grpc::KillEventStream;
    async fn watch_kills(
        &self,
        _: tonic::Request<pb::WatchKillsRequest>,
    ) -> Result<tonic::Response<Self::WatchKillsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
}

/// Both echoes' answer to KillAndReap: a reply shaped like reapd's for a
/// reaped 1 MiB victim, so the floor of a kill call is measured with the
/// same clients, reply size and decoding as the broker's (nothing is
/// killed: the benchmark finishes its victims itself).
fn echo_kill_report(pid: i32, start_time: u64) -> reapd_proto::model::KillReport {
    use reapd_proto::model;
    model::KillReport {
        outcome: model::Outcome::Reaped,
        kill_path: model::KillPath::KillThenMrelease,
        target: model::ProcessInfo {
            pid,
            uid: VICTIM_UID,
            euid: VICTIM_UID,
            suid: VICTIM_UID,
            gid: VICTIM_UID,
            comm: "reapd-bench".into(),
            start_time,
            cgroup: "/user.slice/user-0.slice/session-1.scope".into(),
        },
        memory_before: model::MemoryUsage {
            anon_bytes: 1 << 20,
            ..Default::default()
        },
        bytes_released: 1 << 20,
        kill_to_reap_ns: 40_000,
        rule: "kill(2)".into(),
        ..Default::default()
    }
}

/// The JSON echo's reply to one NUL-terminated request.
/// With `syscalls`, a CheckPermission is answered after the joint floor's
/// work on its target (an error reply if that fails, so the run stops).
fn json_reply(request: &[u8], syscalls: bool) -> Vec<u8> {
    let parsed: serde_json::Value = serde_json::from_slice(request).unwrap_or_default();
    let field = |name: &str| {
        parsed
            .pointer(&format!("/parameters/{name}"))
            .and_then(serde_json::Value::as_i64)
            .unwrap_or_default()
    };
    let pid = field("pid");
    if parsed.get("method").and_then(serde_json::Value::as_str) == Some("io.reapd.Reaper.KillAndReap") {
        let report = echo_kill_report(pid as i32, field("startTime") as u64);
        let mut reply = serde_json::to_vec(&serde_json::json!({ "parameters": report })).unwrap_or_default();
        reply.push(0);
        return reply;
    }
    if syscalls {
        if let Err(e) = joint_check(pid as i32) {
            let mut reply = serde_json::to_vec(&serde_json::json!({
                "error": "org.varlink.service.InternalError",
                "parameters": { "message": format!("{e:#}") },
            }))
            .unwrap_or_default();
            reply.push(0);
            return reply;
        }
    }
    let mut reply = serde_json::to_vec(&serde_json::json!({ "parameters": {
        "allowed": true,
        "reason": "kill(2) allows it: same uid",
        "kind": "allowed",
        "rule": "kill(2)",
        "target": { "pid": pid, "uid": VICTIM_UID, "euid": VICTIM_UID, "suid": VICTIM_UID, "gid": VICTIM_UID,
            "comm": "reapd-bench", "startTime": 0, "cgroup": "/user.slice/user-0.slice/session-1.scope" },
    }}))
    .unwrap_or_default();
    reply.push(0);
    reply
}

async fn json_connection(mut stream: tokio::net::UnixStream, syscalls: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..n]);
        while let Some(end) = buffer.iter().position(|&b| b == 0) {
            let reply = json_reply(&buffer[..end], syscalls);
            buffer.drain(..=end);
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
    }
}

/// The `floor-server` mode: serve both echoes until killed (with
/// `syscalls`, the joint floor).
pub fn server_main(grpc: &Path, varlink: &Path, syscalls: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = std::fs::remove_file(grpc);
        let _ = std::fs::remove_file(varlink);
        let grpc_listener = tokio::net::UnixListener::bind(grpc)?;
        let json_listener = tokio::net::UnixListener::bind(varlink)?;
        // Unprivileged kill workers never reach the floor, but keep the
        // sockets as open as the broker's.
        for path in [grpc, varlink] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        }
        tokio::spawn(async move {
            while let Ok((stream, _)) = json_listener.accept().await {
                tokio::spawn(json_connection(stream, syscalls));
            }
        });
        println!("ready");
        std::io::stdout().flush()?;
        tonic::transport::Server::builder()
            .add_service(pb::reaper_server::ReaperServer::new(Echo { syscalls }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(grpc_listener))
            .await?;
        anyhow::Ok(())
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One sequential caller: a connection (or the in-process work) that makes
/// one CheckPermission-equivalent call per invocation.
type Caller = Box<dyn FnMut() -> anyhow::Result<()>>;

fn grpc_caller(socket: &Path, target: Target) -> anyhow::Result<Caller> {
    let mut client = blocking::Client::connect(socket)?;
    Ok(Box::new(move || {
        client.check_permission(target.clone())?;
        Ok(())
    }))
}

fn varlink_caller(socket: &Path, target: Target) -> anyhow::Result<Caller> {
    use reapd_client::varlink::Client;
    let mut client = Client::connect(socket)?;
    Ok(Box::new(move || {
        client.check_permission(target.clone())?;
        Ok(())
    }))
}

/// Opens, reads once (one read() into a stack buffer) and closes `path`.
pub(crate) fn read_once(path: &str) -> std::io::Result<usize> {
    let mut file = std::fs::File::open(path)?;
    let mut buffer = [0u8; 4096];
    let n = file.read(&mut buffer)?;
    std::hint::black_box(&buffer[..n]);
    Ok(n)
}

/// The syscalls the broker must make to pin and decide on `pid` (see the
/// module docs), done in-process.
pub fn inprocess_check_once(pid: i32, paths: &[String; 4]) -> anyhow::Result<()> {
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let raw = Pid::from_raw(pid).ok_or_else(|| anyhow::anyhow!("bad pid"))?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
    let wanted = reapd::os::sys::PIDFD_INFO_CREDS | reapd::os::sys::PIDFD_INFO_PID;
    if reapd::os::sys::pidfd_get_info(pidfd.as_fd(), wanted).is_err() {
        read_once(&paths[0])?;
    }
    for path in &paths[1..] {
        read_once(path)?;
    }
    anyhow::ensure!(reapd::engine::target::is_running(pidfd.as_fd()), "target exited");
    Ok(())
}

fn inprocess_caller(pid: i32) -> Caller {
    let paths = ["status", "stat", "oom_score_adj", "cgroup"].map(|f| format!("/proc/{pid}/{f}"));
    Box::new(move || inprocess_check_once(pid, &paths))
}

/// Sum of the on-CPU nanoseconds of every thread of `pid`.
fn cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Times `n` calls, or `n` calls each after an idle gap.
fn timed(caller: &mut Caller, n: usize, gap: Option<Duration>) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if let Some(gap) = gap {
            std::thread::sleep(gap);
        }
        let t0 = Instant::now();
        caller()?;
        out.push(us(t0.elapsed()));
    }
    Ok(out)
}

/// Counts the syscalls `pid`'s threads make during `n` calls, with
/// strace -c -f attached to every thread. `None` without strace.
fn count_syscalls(pid: i32, caller: &mut Caller, n: usize) -> anyhow::Result<Option<f64>> {
    let out = std::env::temp_dir().join(format!("reapd-bench-strace-{}-{pid}", std::process::id()));
    let Ok(mut strace) = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&out)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Ok(None);
    };
    // Traced once every thread names strace as its tracer.
    let tracer = strace.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.strip_prefix("TracerPid:").map(str::trim) == Some(&tracer))
            })
        });
        if all {
            break;
        }
        if Instant::now() > deadline {
            let _ = strace.kill();
            let _ = strace.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let result = timed(caller, n, None);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(strace.id() as i32).ok_or_else(|| anyhow::anyhow!("bad pid"))?,
        rustix::process::Signal::INT,
    )?;
    strace.wait()?;
    result?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    // The last line: "100.00 0.001 1 2345 12 total".
    let total = text.lines().find(|l| l.trim_end().ends_with("total")).and_then(|l| {
        // Columns: % time, seconds, usecs/call, calls, [errors], name.
        l.split_whitespace().nth(3).and_then(|v| v.parse::<f64>().ok())
    });
    Ok(total.map(|t| t / n as f64))
}

/// Syscalls of the in-process check, counted on this thread.
fn count_inprocess_syscalls(pid: i32, n: usize) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let out = std::env::temp_dir().join(format!("reapd-bench-strace-inproc-{}", std::process::id()));
    let status = Command::new("strace")
        .args(["-c", "-o"])
        .arg(&out)
        .arg(&exe)
        .args(["inprocess-check", "--pid", &pid.to_string(), "--count", &n.to_string()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "strace of the in-process check failed");
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    // Count only what the loop calls: pidfd_open once per call.
    let per_syscall = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .and_then(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.get(3).and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let total: f64 = ["pidfd_open", "ioctl", "openat", "read", "close", "poll", "ppoll"]
        .iter()
        .map(|s| per_syscall(s))
        .sum();
    Ok(total / n as f64)
}

/// The `inprocess-check` mode (for strace): `count` in-process checks.
pub fn inprocess_main(pid: i32, count: usize) -> anyhow::Result<()> {
    let mut caller = inprocess_caller(pid);
    for _ in 0..count {
        caller()?;
    }
    Ok(())
}

/// Closed-loop throughput with `clients` connections, each on a thread of
/// its own (blocking clients), for `duration`.
fn throughput(
    make: &(dyn Fn() -> anyhow::Result<Caller> + Sync),
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let barrier = std::sync::Barrier::new(clients + 1);
    let total = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || -> anyhow::Result<usize> {
                    let made = make();
                    barrier.wait();
                    let mut caller = made?;
                    caller()?;
                    let deadline = Instant::now() + duration;
                    let mut calls = 0;
                    while Instant::now() < deadline {
                        caller()?;
                        calls += 1;
                    }
                    Ok(calls)
                })
            })
            .collect();
        barrier.wait();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        anyhow::Ok(total)
    })?;
    Ok(total as f64 / duration.as_secs_f64())
}

/// Latency at a fixed arrival rate: 4 connections, each sending on its own
/// schedule (rate/4 a second, staggered); latency counts from the scheduled
/// send, so a slow reply delays the next call's clock too (no coordinated
/// omission).
fn fixed_rate(
    make: &(dyn Fn() -> anyhow::Result<Caller> + Sync),
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Vec<f64>> {
    const CONNECTIONS: usize = 4;
    let interval = Duration::from_secs_f64(CONNECTIONS as f64 / rate);
    let per_conn = ((duration.as_secs_f64() * rate) as usize / CONNECTIONS).max(1);
    let barrier = std::sync::Barrier::new(CONNECTIONS + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let made = make();
                    barrier.wait();
                    let mut caller = made?;
                    caller()?;
                    let start = Instant::now() + interval.mul_f64(i as f64 / CONNECTIONS as f64);
                    let mut out = Vec::with_capacity(per_conn);
                    for k in 0..per_conn {
                        let due = start + interval * k as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        caller()?;
                        out.push(us(due.elapsed()));
                    }
                    Ok(out)
                })
            })
            .collect();
        barrier.wait();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??);
        }
        Ok(all)
    })
}

/// Instructions per call, counted by callgrind (Ir: instructions executed
/// by every thread of the process, the same on any CPU and unaffected by
/// the other helpers' load). A server runs under callgrind once with no
/// measured calls (the baseline) and once per transport with `calls`
/// calls; every run starts the same way, opens one connection per
/// transport and makes `warm` calls on each, so start-up, connection set-up
/// and first-call costs cancel in the difference, which is divided by
/// `calls`. The in-process check is counted the same way
/// (`inprocess-check --count warm` and `--count warm+calls`).
pub struct Callgrind {
    valgrind: PathBuf,
    /// `valgrind --version`, for the table note.
    pub version: String,
    dir: PathBuf,
    pub warm: usize,
    pub calls: usize,
    runs: usize,
    /// Syscall numbers valgrind reported as unhandled, over every run.
    pub unhandled: std::collections::BTreeSet<u32>,
}

/// The path printed by bench/valgrind.sh (or `REAPD_VALGRIND`), with the
/// script's reason when there is none.
fn find_valgrind() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("REAPD_VALGRIND") {
        return Ok(PathBuf::from(path));
    }
    // The script beside this crate's sources: reapd-bench runs from the
    // checkout it was built in (bench/run.sh, the smoke test).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("valgrind.sh");
    let out = Command::new("bash").arg(&script).stdin(Stdio::null()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason = stderr.lines().last().unwrap_or_default().trim();
    anyhow::ensure!(out.status.success(), "{} failed: {reason}", script.display());
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Names of the syscalls valgrind is known to miss on this path.
fn syscall_name(nr: u32) -> &'static str {
    match nr {
        317 => "seccomp",
        434 => "pidfd_open",
        438 => "pidfd_getfd",
        448 => "process_mrelease",
        _ => "?",
    }
}

/// Whether every thread of `pid` sleeps (state S), so nothing is in
/// flight when it is stopped.
fn all_asleep(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            // "tid (comm) S ...": the state follows the last ')'.
            s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("S")
        })
    })
}

impl Callgrind {
    pub fn new(dir: &Path, warm: usize, calls: usize) -> anyhow::Result<Callgrind> {
        let valgrind = find_valgrind()?;
        let out = Command::new(&valgrind).arg("--version").output()?;
        anyhow::ensure!(out.status.success(), "{} --version failed", valgrind.display());
        let dir = dir.join("callgrind");
        std::fs::create_dir_all(&dir)?;
        Ok(Callgrind {
            valgrind,
            version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            dir,
            warm,
            calls,
            runs: 0,
            unhandled: Default::default(),
        })
    }

    /// The Ir of one run of `program args` under callgrind while `work`
    /// runs. The process is then stopped with SIGUSR2, which neither the
    /// broker nor the floor server handles: callgrind writes its totals on
    /// the fatal signal, and no shutdown path runs (its cost would differ
    /// from run to run). `work` gets the process (to see it exit early) and
    /// returns what must stay open until it is stopped (the connections:
    /// closing them first would race their teardown with the signal).
    fn ir<T>(
        &mut self,
        program: &Path,
        args: &[OsString],
        work: impl FnOnce(&mut Child) -> anyhow::Result<T>,
    ) -> anyhow::Result<f64> {
        self.runs += 1;
        let out = self.dir.join(format!("callgrind.out.{}", self.runs));
        let log = self.dir.join(format!("run{}.log", self.runs));
        let mut child = Command::new(&self.valgrind)
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(program)
            .args(args)
            .env("REAPD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let worked = work(&mut child);
        // A process that ended by itself (or was reaped by `work`) is not
        // signalled: its pid may be another process's by now.
        if child.try_wait()?.is_none() {
            if worked.is_ok() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while !all_asleep(child.id()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::USR2);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{} did not end under callgrind", program.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        self.unhandled.extend(log_text.lines().filter_map(|l| {
            l.split_once("unhandled amd64-linux syscall: ")
                .and_then(|(_, nr)| nr.trim().parse::<u32>().ok())
        }));
        let kept = worked.map_err(|e| {
            // Say what valgrind said: an unhandled syscall, or the
            // program's own last words.
            let last = log_text
                .lines()
                .rfind(|l| l.contains("unhandled") || l.contains("ERROR") || l.contains("rror:"))
                .unwrap_or_default()
                .to_string();
            anyhow::anyhow!("{e}; {} says: {last:?}", log.display())
        })?;
        drop(kept);
        let text = std::fs::read_to_string(&out)?;
        text.lines()
            .find_map(|l| l.strip_prefix("totals: ").or_else(|| l.strip_prefix("summary: ")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no totals in {}", out.display()))
    }

    /// Instructions per CheckPermission of one server on each transport
    /// (gRPC, varlink): three runs, see [`Callgrind`].
    fn server(
        &mut self,
        program: &Path,
        args: &[OsString],
        grpc: &Path,
        varlink: &Path,
        target: &Target,
    ) -> anyhow::Result<(f64, f64)> {
        let (warm, calls) = (self.warm, self.calls);
        let mut run = |measured: Option<bool>| {
            let _ = std::fs::remove_file(grpc);
            let _ = std::fs::remove_file(varlink);
            self.ir(program, args, |child| {
                let mut grpc_c = connect_once(child, || grpc_caller(grpc, target.clone()))?;
                let mut varlink_c = connect_once(child, || varlink_caller(varlink, target.clone()))?;
                for _ in 0..warm {
                    grpc_c()?;
                    varlink_c()?;
                }
                let n = if measured.is_some() { calls } else { 0 };
                let caller = if measured == Some(true) {
                    &mut varlink_c
                } else {
                    &mut grpc_c
                };
                for _ in 0..n {
                    caller()?;
                }
                Ok((grpc_c, varlink_c))
            })
        };
        let base = run(None)?;
        let g = run(Some(false))?;
        let v = run(Some(true))?;
        Ok(((g - base) / calls as f64, (v - base) / calls as f64))
    }

    /// Instructions per in-process check (the syscalls the broker must
    /// make, done by `reapd-bench inprocess-check`).
    fn inprocess(&mut self, pid: i32) -> anyhow::Result<f64> {
        let exe = std::env::current_exe()?;
        let (warm, calls) = (self.warm, self.calls);
        let mut count = |n: usize| {
            let args = ["inprocess-check", "--pid", &pid.to_string(), "--count", &n.to_string()].map(Into::into);
            self.ir(&exe, &args, |child| {
                // It ends by itself; wait so the signal finds nothing.
                let status = child.wait()?;
                anyhow::ensure!(status.success(), "inprocess-check under callgrind: {status}");
                Ok(())
            })
        };
        let base = count(warm)?;
        let measured = count(warm + calls)?;
        Ok((measured - base) / calls as f64)
    }
}

/// Connects once to a server starting under valgrind: a refused connect
/// costs the server nothing, so every run makes exactly one connection.
fn connect_once(child: &mut Child, connect: impl Fn() -> anyhow::Result<Caller>) -> anyhow::Result<Caller> {
    // Start-up under valgrind is ~50 times slower, and the CPUs are shared.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match connect() {
            Ok(c) => return Ok(c),
            Err(e) => {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("exited under valgrind ({status})");
                }
                anyhow::ensure!(Instant::now() < deadline, "did not answer under valgrind: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A server under test: its label, pid and sockets.
struct Subject {
    label: String,
    pid: i32,
    grpc: PathBuf,
    varlink: PathBuf,
    binary: Option<PathBuf>,
}

/// How long after the footprint soak the settled figures are read: the
/// broker gives memory back after 2 s without calls and lets idle blocking
/// threads go after 2 s (broker/src/server.rs, `QUIET_TICK`).
const SETTLE: Duration = Duration::from_secs(6);

/// Runs the floor benchmark against the bare echoes and each broker binary
/// in `brokers` (label, path), interleaved.
pub fn run(cfg: &Config, brokers: &[(String, PathBuf)], dir: &Path) -> anyhow::Result<FloorResults> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut notes = Vec::new();
    let target_victim = Victim::spawn(&Memory::Anon(crate::overhead::TINY), Some(VICTIM_UID))?;
    let target = Target::pinned(target_victim.pid)?;
    let floor = FloorServer::start(dir, false)?;
    let joint = FloorServer::start(dir, true)?;
    let mut running = Vec::new();
    let mut subjects = vec![Subject {
        label: "bare echo".into(),
        pid: floor.pid(),
        grpc: floor.grpc.clone(),
        varlink: floor.varlink.clone(),
        binary: None,
    }];
    for (i, (label, path)) in brokers.iter().enumerate() {
        let b = rt.block_on(Broker::start(path, dir, &format!("floor{i}"), &[]))?;
        subjects.push(Subject {
            label: label.clone(),
            pid: b.pid(),
            grpc: b.socket.clone(),
            varlink: b.varlink.clone(),
            binary: Some(path.clone()),
        });
        running.push(b);
    }
    let mut servers: Vec<Server> = subjects
        .iter()
        .map(|s| Server {
            label: s.label.clone(),
            binary_bytes: s
                .binary
                .as_ref()
                .and_then(|b| std::fs::metadata(b).ok())
                .map_or(0, |m| m.len()),
            ..Server::default()
        })
        .collect();

    // Idle footprint: after one call of each kind, then a pause.
    for s in &subjects {
        grpc_caller(&s.grpc, target.clone())?()?;
        varlink_caller(&s.varlink, target.clone())?()?;
    }
    std::thread::sleep(Duration::from_millis(300));
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        server.threads_idle = threads(s.pid);
        server.rss_idle = crate::probe::status_bytes(s.pid, "VmRSS").unwrap_or(0);
        server.anon_idle = crate::probe::status_bytes(s.pid, "RssAnon").unwrap_or(0);
    }

    // The footprint criterion, on a broker that has done nothing
    // else yet: 100k checks over 16 connections, then quiet.
    eprintln!("floor: footprint after {} calls", cfg.soak_calls);
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        rt.block_on(crate::overhead::many_calls(&s.grpc, target.clone(), cfg.soak_calls, 16))?;
        server.calls_before_after = cfg.soak_calls;
    }
    let soaked = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        server.threads_after = threads(s.pid);
        server.rss_after = crate::probe::status_bytes(s.pid, "VmRSS").unwrap_or(0);
    }
    // A measurement window, not a wait for an event: what the server holds
    // once it has been quiet for a while.
    std::thread::sleep(SETTLE.saturating_sub(soaked.elapsed()));
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        server.threads_settled = threads(s.pid);
        server.rss_settled = crate::probe::status_bytes(s.pid, "VmRSS").unwrap_or(0);
        server.anon_settled = crate::probe::status_bytes(s.pid, "RssAnon").unwrap_or(0);
    }

    // Latency, interleaved: every path's warm block in turn, repeated; then
    // after-idle calls, one path after another.
    eprintln!("floor: latency");
    let mut callers: Vec<Caller> = vec![inprocess_caller(target_victim.pid)];
    for s in &subjects {
        callers.push(grpc_caller(&s.grpc, target.clone())?);
        callers.push(varlink_caller(&s.varlink, target.clone())?);
    }
    // The joint floors last: indices `joint_at` (gRPC) and `joint_at + 1`.
    let joint_at = callers.len();
    callers.push(grpc_caller(&joint.grpc, target.clone())?);
    callers.push(varlink_caller(&joint.varlink, target.clone())?);
    let mut warm: Vec<Vec<f64>> = vec![Vec::new(); callers.len()];
    let mut idle: Vec<Vec<f64>> = vec![Vec::new(); callers.len()];
    for _ in 0..cfg.reps {
        for (caller, samples) in callers.iter_mut().zip(warm.iter_mut()) {
            timed(caller, 50, None)?;
            samples.extend(timed(caller, cfg.warm_calls, None)?);
        }
    }
    for _ in 0..cfg.idle_calls * cfg.reps {
        for (caller, samples) in callers.iter_mut().zip(idle.iter_mut()) {
            samples.extend(timed(caller, 1, Some(IDLE_GAP))?);
        }
    }
    drop(callers);
    drop(joint);
    let pair = |i: usize| Pair {
        warm: summarize(&warm[i]),
        idle: summarize(&idle[i]),
    };
    let inprocess_check = pair(0);
    // Paired by round: path i's n-th idle call against the floor's and the
    // in-process n-th, made within the same second.
    let own = |i: usize, floor: usize| {
        let rounds = idle[i].iter().zip(&idle[floor]).zip(&idle[0]);
        median_ci(&rounds.map(|((b, f), s)| b - f - s).collect::<Vec<_>>())
    };
    let own_joint = |i: usize, joint: usize| {
        let rounds = idle[i].iter().zip(&idle[joint]);
        median_ci(&rounds.map(|(b, f)| b - f).collect::<Vec<_>>())
    };
    for (k, server) in servers.iter_mut().enumerate() {
        server.grpc.check = pair(1 + 2 * k);
        server.varlink.check = pair(2 + 2 * k);
        if k > 0 {
            server.grpc.idle_own = Some(own(1 + 2 * k, 1));
            server.varlink.idle_own = Some(own(2 + 2 * k, 2));
            server.grpc.idle_own_joint = Some(own_joint(1 + 2 * k, joint_at));
            server.varlink.idle_own_joint = Some(own_joint(2 + 2 * k, joint_at + 1));
        }
    }
    let (joint_grpc, joint_varlink) = (pair(joint_at), pair(joint_at + 1));

    eprintln!("floor: CPU and syscalls per call");
    let have_strace = Command::new("strace").arg("-V").stdout(Stdio::null()).status().is_ok();
    if !have_strace {
        notes.push("strace not found: no syscall counts".into());
    }
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        for (varlink, t) in [(false, &mut server.grpc), (true, &mut server.varlink)] {
            let mut caller = if varlink {
                varlink_caller(&s.varlink, target.clone())?
            } else {
                grpc_caller(&s.grpc, target.clone())?
            };
            timed(&mut caller, 50, None)?;
            let before = cpu_ns(s.pid);
            timed(&mut caller, cfg.cost_calls, None)?;
            t.cost.cpu_us = (cpu_ns(s.pid).saturating_sub(before)) as f64 / 1e3 / cfg.cost_calls as f64;
            if have_strace {
                t.cost.syscalls = count_syscalls(s.pid, &mut caller, cfg.cost_calls.min(500))?;
            }
        }
    }
    let inprocess_syscalls = if have_strace {
        count_inprocess_syscalls(target_victim.pid, cfg.cost_calls)?
    } else {
        f64::NAN
    };

    eprintln!("floor: throughput and fixed-rate latency");
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        let grpc_path = s.grpc.clone();
        let varlink_path = s.varlink.clone();
        let (grpc_target, varlink_target) = (target.clone(), target.clone());
        let make_grpc = move || grpc_caller(&grpc_path, grpc_target.clone());
        let make_varlink = move || varlink_caller(&varlink_path, varlink_target.clone());
        for (make, t) in [
            (
                &make_grpc as &(dyn Fn() -> anyhow::Result<Caller> + Sync),
                &mut server.grpc,
            ),
            (&make_varlink, &mut server.varlink),
        ] {
            for &c in &cfg.clients {
                t.throughput.push((c, throughput(make, c, cfg.tput_duration)?));
            }
            t.fixed_rate = summarize(&fixed_rate(make, cfg.rate_per_sec, cfg.rate_duration)?);
            t.fixed_rate_busy = Some(summarize(&fixed_rate(make, cfg.busy_rate_per_sec, cfg.rate_duration)?));
        }
    }

    eprintln!("floor: KillAndReap");
    let (workers, per_worker) = cfg.kills;
    // Frozen victims (v1 freezer): the reap does all the work, with no race
    // against the victim's own exit path.
    let freezer = match crate::probe::FreezerCgroup::create("floor-kill") {
        Ok(f) => Some(f),
        Err(err) => {
            notes.push(format!("KillAndReap victims run, not frozen: no v1 freezer ({err})"));
            None
        }
    };
    let frozen = freezer.is_some();
    let inprocess_kill = summarize(&crate::overhead::kill_inprocess(
        workers * per_worker,
        freezer.as_ref(),
    )?);
    // The echoes first: their KillAndReap answers are the transport floor
    // of a kill call, measured with the same workers and victims.
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        server.kill_grpc = Some(summarize(&crate::overhead::kill_grpc(
            &s.grpc,
            workers,
            per_worker,
            false,
            VICTIM_UID + 1,
            freezer.as_ref(),
        )?));
        server.kill_varlink = Some(summarize(&crate::overhead::kill_grpc(
            &s.varlink,
            workers,
            per_worker,
            true,
            VICTIM_UID + 101,
            freezer.as_ref(),
        )?));
    }
    drop(freezer);

    // The whole run's residue, for comparison: everything above (kills,
    // 64-client throughput, the fixed-rate runs) also left its mark.
    std::thread::sleep(SETTLE);
    for (s, server) in subjects.iter().zip(servers.iter_mut()) {
        server.rss_end = crate::probe::status_bytes(s.pid, "VmRSS").unwrap_or(0);
        server.anon_end = crate::probe::status_bytes(s.pid, "RssAnon").unwrap_or(0);
    }
    drop(running);
    drop(floor);

    let mut inprocess_instructions = None;
    let mut callgrind_run = None;
    if let Some((warm, calls)) = cfg.callgrind {
        eprintln!("floor: instructions per call (callgrind)");
        match Callgrind::new(dir, warm, calls) {
            Err(e) => notes.push(format!("no instruction counts: {e}")),
            Ok(mut cg) => {
                let exe = std::env::current_exe()?;
                for (s, server) in subjects.iter().zip(servers.iter_mut()) {
                    let (program, args) = match &s.binary {
                        None => (exe.clone(), FloorServer::args(&s.grpc, &s.varlink)),
                        Some(reapd) => (reapd.clone(), broker_args(dir, &s.grpc, &s.varlink)?),
                    };
                    match cg.server(&program, &args, &s.grpc, &s.varlink, &target) {
                        Ok((g, v)) => {
                            server.grpc.cost.instructions = Some(g);
                            server.varlink.cost.instructions = Some(v);
                        }
                        Err(e) => notes.push(format!("no instruction counts for {}: {e}", s.label)),
                    }
                }
                match cg.inprocess(target_victim.pid) {
                    Ok(ir) => inprocess_instructions = Some(ir),
                    Err(e) => notes.push(format!("no instruction counts for the in-process check: {e}")),
                }
                callgrind_run = Some(CallgrindRun {
                    version: cg.version.clone(),
                    warm,
                    calls,
                    unhandled: cg
                        .unhandled
                        .iter()
                        .map(|&nr| (nr, syscall_name(nr).to_string()))
                        .collect(),
                });
            }
        }
    }
    target_victim.finish();
    Ok(FloorResults {
        quick: cfg.quick,
        reps: cfg.reps,
        warm_calls: cfg.warm_calls,
        idle_calls: cfg.idle_calls,
        rate_per_sec: cfg.rate_per_sec,
        busy_rate_per_sec: cfg.busy_rate_per_sec,
        inprocess_check,
        joint_grpc: Some(joint_grpc),
        joint_varlink: Some(joint_varlink),
        inprocess_syscalls,
        inprocess_instructions,
        callgrind: callgrind_run,
        inprocess_kill,
        kill_frozen: frozen,
        kills_per_caller: per_worker,
        servers,
        notes,
    })
}

fn threads(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn opt(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or("–".into(), |v| format!("{v:.0}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// How the instructions column was counted, for the note above the table.
fn instructions_method(r: &FloorResults) -> String {
    let Some(cg) = &r.callgrind else {
        return "callgrind, not run".into();
    };
    let mut text = format!(
        "{} --tool=callgrind: Ir, the user-space instructions of every thread of the server process (the kernel's work in its syscalls is not counted), a separate pass: each server started under callgrind three times, each run opening one gRPC and one varlink connection and making {} calls on each, then {} more CheckPermission calls on one transport (or none: the baseline); the run's Ir minus the baseline's, ÷ {}, so start-up and connection costs cancel. The in-process row: `reapd-bench inprocess-check` with {} checks minus {}, ÷ {}. Brokers run with --no-seccomp under valgrind: valgrind cannot apply a seccomp filter to its guest (seccomp(2) is unknown to it), and the broker's allow-list would forbid valgrind's own syscalls",
        cg.version,
        cg.warm,
        cg.calls,
        cg.calls,
        cg.warm + cg.calls,
        cg.warm,
        cg.calls
    );
    if !cg.unhandled.is_empty() {
        let list: Vec<String> = cg.unhandled.iter().map(|(nr, name)| format!("{nr} ({name})")).collect();
        text.push_str(&format!(
            "; syscalls valgrind does not handle (it answers ENOSYS to the guest): {}",
            list.join(", ")
        ));
        if cg.unhandled.iter().any(|(nr, _)| *nr == 448) {
            text.push_str(" (the broker probes process_mrelease at start and then takes the kill-only path; CheckPermission never calls it)");
        }
    }
    text
}

/// The floor section of docs/benchmarks.md.
pub fn markdown(r: &FloorResults) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let Some(echo) = r.servers.first() else {
        return md;
    };
    let inproc = &r.inprocess_check;
    let _ = writeln!(md, "## 0. Against the floor\n");
    let _ = writeln!(
        md,
        "What reapd costs above what any broker must cost: the **transport floor** (a bare tonic server of the same `reapd.v1.Reaper` service answering at once, same tonic/tokio versions and 2 worker threads; a bare NUL-delimited JSON echo for varlink; both reached by the same `reapd-client` clients) plus the **in-process syscalls** the broker must make per call (pidfd_open, PIDFD_GET_INFO, one read() each of /proc/PID/stat, oom_score_adj and cgroup, a poll of the pidfd; caller identification happens once per connection, at accept). Brokers: {}. p50 µs over {} repetitions of {} warm calls (one connection, sequential) and {} calls each after a {} ms idle gap; all paths interleaved in one run. The own cost after idle is the median over the idle rounds of each round's (broker − floor − in-process), the three calls made within the same second, with its 95 % interval in brackets: the VM's wake-up from idle costs hundreds of µs and drifts, so an interval wider than the goal means this machine cannot tell. The **joint floor** is the same echo making the in-process syscalls on the requested target before it answers: on this VM floor and syscalls do not add up (measured: the bare tonic echo spinning 10 µs per call answered 25-55 µs later, spinning 20 µs 65-75 µs later, because a server that works that long stops sharing a vCPU with its client and each hand-off then wakes an idle vCPU), so the cost above the joint floor is what reapd adds to what any broker doing the same work pays; its after-idle figure is paired by round like the others.\n",
        r.servers[1..].iter().map(|s| format!("*{}*", s.label)).collect::<Vec<_>>().join(", "),
        r.reps,
        r.warm_calls,
        r.idle_calls * r.reps,
        IDLE_GAP.as_millis()
    );
    let _ = writeln!(
        md,
        "| CheckPermission | warm p50 | warm p99 | after idle p50 | own cost above floor + syscalls (warm / idle) | ÷ (floor + syscalls) warm / idle | own cost above the joint floor (warm / idle) |\n|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| in-process syscalls | {:.0} | {:.0} | {:.0} | | | |",
        inproc.warm.p50, inproc.warm.p99, inproc.idle.p50
    );
    for (name, floor) in [
        ("tonic echo (gRPC floor)", Some(&echo.grpc.check)),
        ("JSON echo (varlink floor)", Some(&echo.varlink.check)),
        (
            "tonic echo making the syscalls (joint gRPC floor)",
            r.joint_grpc.as_ref(),
        ),
        (
            "JSON echo making the syscalls (joint varlink floor)",
            r.joint_varlink.as_ref(),
        ),
    ] {
        let Some(floor) = floor else { continue };
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {:.0} | | | |",
            floor.warm.p50, floor.warm.p99, floor.idle.p50
        );
    }
    for s in &r.servers[1..] {
        for (transport, t, floor, joint) in [
            ("gRPC", &s.grpc, &echo.grpc, &r.joint_grpc),
            ("varlink", &s.varlink, &echo.varlink, &r.joint_varlink),
        ] {
            let base_w = floor.check.warm.p50 + inproc.warm.p50;
            let base_i = floor.check.idle.p50 + inproc.idle.p50;
            // Older results have no paired figure: the difference of medians.
            let idle_own = match t.idle_own {
                Some(m) => format!("{:.0} [{:.0}, {:.0}]", m.p50, m.lo, m.hi),
                None => format!("{:.0}", t.check.idle.p50 - base_i),
            };
            let own_joint = match (joint, t.idle_own_joint) {
                (Some(j), Some(m)) => format!(
                    "**{:.0}** / {:.0} [{:.0}, {:.0}]",
                    t.check.warm.p50 - j.warm.p50,
                    m.p50,
                    m.lo,
                    m.hi
                ),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} {transport} | {:.0} | {:.0} | {:.0} | **{:.0}** / {idle_own} | {:.2}× / {:.2}× | {own_joint} |",
                s.label,
                t.check.warm.p50,
                t.check.warm.p99,
                t.check.idle.p50,
                t.check.warm.p50 - base_w,
                t.check.warm.p50 / base_w,
                t.check.idle.p50 / base_i,
            );
        }
    }
    let _ = writeln!(
        md,
        "\nKillAndReap of a {} 1 MiB victim, killed by a process that is not its parent, each caller a fresh unprivileged process making {} calls in a row over one connection (p50 µs; the transport floor is the bare echo's answer to the same calls from the same callers, with a reply shaped like reapd's; in-process, what the broker must do: pidfd_open, PIDFD_GET_INFO, one read() each of status, stat, oom_score_adj and cgroup, pidfd_send_signal(SIGKILL), process_mrelease: {:.0} µs):\n",
        if r.kill_frozen { "frozen (v1 freezer)" } else { "running" },
        r.kills_per_caller,
        r.inprocess_kill.p50
    );
    let _ = writeln!(
        md,
        "| server | transport | p50 | p90 | ÷ (floor + in-process) |\n|---|---|---|---|---|"
    );
    for s in &r.servers {
        for (transport, k, floor) in [
            ("gRPC", &s.kill_grpc, &echo.kill_grpc),
            ("varlink", &s.kill_varlink, &echo.kill_varlink),
        ] {
            let Some(k) = k else { continue };
            // The echo's own row is the floor: no ratio.
            let ratio = match floor {
                Some(floor) if !std::ptr::eq(s, echo) => {
                    format!("**{:.2}×**", k.p50 / (floor.p50 + r.inprocess_kill.p50))
                }
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "| {} | {transport} | {:.0} | {:.0} | {ratio} |",
                s.label, k.p50, k.p90
            );
        }
    }
    let _ = writeln!(
        md,
        "\nPer CheckPermission, server side: on-CPU time of all the server's threads (/proc/PID/task/*/schedstat), syscalls (strace -c -f on every thread, a separate pass) and instructions ({}).\n",
        instructions_method(r)
    );
    let _ = writeln!(
        md,
        "| server | transport | CPU µs/call | syscalls/call | instructions/call |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| in-process syscalls | – | – | {:.1} | {} |",
        r.inprocess_syscalls,
        opt(r.inprocess_instructions)
    );
    for s in &r.servers {
        for (transport, t) in [("gRPC", &s.grpc), ("varlink", &s.varlink)] {
            let _ = writeln!(
                md,
                "| {} | {transport} | {:.0} | {} | {} |",
                s.label,
                t.cost.cpu_us,
                t.cost.syscalls.map_or("–".into(), |v| format!("{v:.1}")),
                opt(t.cost.instructions)
            );
        }
    }
    let _ = writeln!(
        md,
        "\nThroughput (closed loop, one connection per client thread, blocking clients; client and server share the 2 CPUs) and latency at a fixed arrival rate of {:.0} calls/s and of {:.0} calls/s over 4 connections (µs from the scheduled send; at the lower rate the CPUs go idle between calls and each call pays the VM's wake-up from idle, at the higher one they stay awake):\n",
        r.rate_per_sec, r.busy_rate_per_sec
    );
    let clients: Vec<usize> = echo.grpc.throughput.iter().map(|(c, _)| *c).collect();
    let mut header = String::from("| server | transport |");
    for c in &clients {
        let _ = write!(
            header,
            " {c} client{} calls/s (÷ tonic floor) |",
            if *c == 1 { "" } else { "s" }
        );
    }
    let _ = write!(
        header,
        " {:.0}/s p50 | p99 | p99 ÷ p50 | {:.0}/s p50 | p99 | p99 ÷ p50 |",
        r.rate_per_sec, r.busy_rate_per_sec
    );
    let _ = writeln!(md, "{header}\n|{}", "---|".repeat(clients.len() + 8));
    for s in &r.servers {
        for (transport, t) in [("gRPC", &s.grpc), ("varlink", &s.varlink)] {
            let mut row = format!("| {} | {transport} |", s.label);
            for (i, (_, cps)) in t.throughput.iter().enumerate() {
                let floor = echo.grpc.throughput.get(i).map_or(f64::NAN, |(_, f)| *f);
                let _ = write!(row, " {cps:.0} ({:.2}×) |", cps / floor);
            }
            for f in [Some(&t.fixed_rate), t.fixed_rate_busy.as_ref()] {
                match f {
                    Some(f) => {
                        let _ = write!(row, " {:.0} | {:.0} | {:.1} |", f.p50, f.p99, f.p99 / f.p50);
                    }
                    None => row.push_str(" – | – | – |"),
                }
            }
            let _ = writeln!(md, "{row}");
        }
    }
    let _ = writeln!(
        md,
        "\nFootprint: threads and RSS idle (after one call per transport), right after {} CheckPermission calls over 16 gRPC connections (made right after the idle reading, before anything else), and {} s after those calls (settled); then at the end of the whole run, {} s after its last call (kills, 64-client throughput and the fixed-rate runs included); anonymous memory (RssAnon) in brackets, the rest is file-backed (text of the binary and the C library):\n",
        r.servers.get(1).map_or(0, |s| s.calls_before_after),
        SETTLE.as_secs(),
        SETTLE.as_secs()
    );
    let _ = writeln!(
        md,
        "| server | threads idle / after / settled | RSS idle | RSS after | RSS settled | settled ÷ idle | RSS end of run | end ÷ idle | binary |\n|---|---|---|---|---|---|---|---|---|"
    );
    for s in &r.servers {
        let _ = writeln!(
            md,
            "| {} | {} / {} / {} | {:.1} MiB ({:.1}) | {:.1} MiB | {:.1} MiB ({:.1}) | {:.2}× | {:.1} MiB ({:.1}) | {:.2}× | {} |",
            s.label,
            s.threads_idle,
            s.threads_after,
            s.threads_settled,
            mib(s.rss_idle),
            mib(s.anon_idle),
            mib(s.rss_after),
            mib(s.rss_settled),
            mib(s.anon_settled),
            s.rss_settled as f64 / s.rss_idle.max(1) as f64,
            mib(s.rss_end),
            mib(s.anon_end),
            s.rss_end as f64 / s.rss_idle.max(1) as f64,
            if s.binary_bytes > 0 {
                format!("{:.1} MiB", mib(s.binary_bytes))
            } else {
                "–".into()
            }
        );
    }
    for n in &r.notes {
        let _ = writeln!(md, "\n- {n}");
    }
    md.push('\n');
    md
}
