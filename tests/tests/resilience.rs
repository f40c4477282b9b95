// SPDX-License-Identifier: MIT OR Apache-2.0
//! Issue 11: hostile clients cost others nothing, no audit record is lost,
//! and long-lived clients just work. Real brokers, real sockets, real uids.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reapd_client::varlink::{pidfd_of, Client as VarlinkClient};
use reapd_client::Target;
use reapd_e2e::{bin, spawn_as, unsafe_kill, wait_for_log, Broker, Creds, Freezer, Value, Victim};
use serde_json::json;

const A: u32 = 61201;
const B: u32 = 61202;
const GRANTED: u32 = 61203;
const MIB: usize = 1 << 20;

/// Victims are forked without exec and inherit the test's open sockets;
/// tests that wait for a hang-up fork under this lock.
static FORKS: Mutex<()> = Mutex::new(());

fn victim(creds: Creds, bytes: usize) -> Victim {
    let _guard = FORKS.lock().unwrap_or_else(|p| p.into_inner());
    Victim::spawn(creds, bytes)
}

/// A policy file private to one test (every test broker gets one, so no
/// test reads the host's /etc/reapd).
fn policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

struct TestBroker {
    broker: Broker,
    _policy_dir: tempfile::TempDir,
}

impl std::ops::Deref for TestBroker {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

impl std::ops::DerefMut for TestBroker {
    fn deref_mut(&mut self) -> &mut Broker {
        &mut self.broker
    }
}

fn start(policy_text: &str, args: &[&str]) -> TestBroker {
    let dir = tempfile::tempdir().unwrap();
    let path = policy(dir.path(), policy_text);
    let mut all = vec!["--policy", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let broker = Broker::start_with(&all, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket(&broker)).is_err() {
        assert!(Instant::now() < deadline, "no varlink socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    TestBroker {
        broker,
        _policy_dir: dir,
    }
}

fn socket(broker: &Broker) -> PathBuf {
    broker.dir.path().join("io.reapd.Reaper")
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS) in one sendmsg.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[&OwnedFd]) {
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: a plain sendmsg with a control buffer sized by CMSG_SPACE for
    // exactly `raw.len()` ints; every pointer is to live local data.
    unsafe {
        let mut control = vec![0u8; libc::CMSG_SPACE(payload) as usize];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len();
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg) as *mut i32, raw.len());
        }
        let sent = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        assert_eq!(
            sent,
            bytes.len() as isize,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn message(value: Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&value).unwrap();
    bytes.push(0);
    bytes
}

/// Reads one NUL-terminated reply.
fn read_reply(stream: &mut UnixStream) -> Option<Value> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == 0 => return serde_json::from_slice(&data).ok(),
            Ok(1) => data.push(byte[0]),
            _ => return None,
        }
    }
}

/// A test whose precondition is missing: says so (libtest hides a passing
/// test's output, so also in $REAPD_SKIP_FILE, which scripts/test.sh counts
/// and prints).
fn skip(reason: &str) {
    eprintln!("SKIP: {reason}");
    if let Some(path) = std::env::var_os("REAPD_SKIP_FILE") {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "SKIP: {reason}");
        }
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Keeps the broker's blocking pool and runtime busy: CheckPermission in a
/// loop on a few connections until dropped.
struct Busy {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Busy {
    fn start(broker: &Broker, connections: usize) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|_| {
                let (path, stop) = (socket(broker), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut client = VarlinkClient::connect(path).unwrap();
                    let mut calls = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = client.check_permission(Target::pid(1));
                        calls += 1;
                    }
                    calls
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A call without fds followed at once by a call carrying a pidfd, each in
/// its own write (as sd-varlink sends them), while the connection is busy
/// with an earlier call, so one read returns both: each call gets exactly
/// its own fds. And in one single write, the kernel attaches the fds to the
/// write's first byte, so they belong to the first message, which names
/// none: they are dropped, the second call has none, nothing is killed.
#[test]
fn pipelined_varlink_calls_keep_their_own_fds() {
    let broker = start("", &[]);
    let _busy = Busy::start(&broker, 4);
    let freezer = Freezer::new("reapd-pipeline");
    for round in 0..20 {
        // The first call takes a while (its victim is frozen, so the wait
        // for exit runs out), so the next two queue up behind it.
        let blocker = victim(Creds::uid(A), 0);
        freezer.freeze(blocker.pid);
        let bystander = victim(Creds::uid(A), 0);
        let target = victim(Creds::uid(A), MIB);
        let pidfd = pidfd_of(target.pid, None).unwrap();
        let mut stream = UnixStream::connect(socket(&broker)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream
            .write_all(&message(json!({
                "method": "io.reapd.Reaper.KillAndReap",
                "parameters": {"pid": blocker.pid, "waitForExitMs": 200},
            })))
            .unwrap();
        send_with_fds(
            &stream,
            &message(json!({"method": "io.reapd.Reaper.CheckPermission", "parameters": {"pid": bystander.pid}})),
            &[],
        );
        send_with_fds(
            &stream,
            &message(
                json!({"method": "io.reapd.Reaper.KillAndReap", "parameters": {"pidfd": 0, "waitForExitMs": 5000}}),
            ),
            &[&pidfd],
        );
        let first = read_reply(&mut stream).expect("reply to the blocking kill");
        assert!(first["parameters"]["outcome"].is_string(), "round {round}: {first}");
        let check = read_reply(&mut stream).expect("reply to the check");
        assert_eq!(check["parameters"]["allowed"], true, "round {round}: {check}");
        assert_eq!(check["parameters"]["target"]["pid"], bystander.pid);
        let kill = read_reply(&mut stream).expect("reply to the pidfd kill");
        assert_eq!(kill["parameters"]["target"]["pid"], target.pid, "round {round}: {kill}");
        assert_eq!(kill["parameters"]["exited"], true, "round {round}: {kill}");
        assert!(!target.running(), "round {round}: the pidfd's process survived");
        assert!(bystander.running());
        freezer.thaw();
        drop((blocker, bystander, target));
    }

    // One write, two messages, fds with its first byte.
    let target = victim(Creds::uid(A), 0);
    let pidfd = pidfd_of(target.pid, None).unwrap();
    let mut stream = UnixStream::connect(socket(&broker)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut both = message(json!({"method": "io.reapd.Reaper.GetCapabilities"}));
    both.extend(message(
        json!({"method": "io.reapd.Reaper.KillAndReap", "parameters": {"pidfd": 0}}),
    ));
    send_with_fds(&stream, &both, &[&pidfd]);
    assert!(read_reply(&mut stream).unwrap()["parameters"]["brokerVersion"].is_string());
    let kill = read_reply(&mut stream).unwrap();
    assert_eq!(kill["error"], "org.varlink.service.InvalidParameter", "{kill}");
    assert!(target.running(), "fds sent with one message were used by another");
}

/// A child killed (and reaped) on drop, so a failing test leaves no broker.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts `reapd` by hand on fixed socket paths (a restart keeps the paths).
fn spawn_reapd(dir: &Path, policy: &Path, log_name: &str, extra: &[&str]) -> KillOnDrop {
    let grpc = dir.join("grpc.sock");
    let child = Command::new(bin("reapd"))
        .arg("--grpc-socket")
        .arg(&grpc)
        .arg("--policy")
        .arg(policy)
        .args(extra)
        .env("REAPD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log_name)).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&grpc).is_err() || UnixStream::connect(dir.join("io.reapd.Reaper")).is_err() {
        assert!(Instant::now() < deadline, "restarted broker did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    KillOnDrop(child)
}

fn sigterm_and_wait(child: &mut Child) -> Duration {
    let t = Instant::now();
    unsafe_kill(child.id() as i32, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return t.elapsed();
        }
        assert!(Instant::now() < deadline, "broker did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the broker closes a connection that never sent a byte: the
/// proof that its slow-loris timeout has run out.
fn wait_until_the_timeout_has_passed(path: &Path) -> Duration {
    let t = Instant::now();
    let mut canary = UnixStream::connect(path).unwrap();
    canary.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // gRPC sends its SETTINGS first: read to the end.
    let mut rest = Vec::new();
    assert!(canary.read_to_end(&mut rest).is_ok(), "the canary was not closed");
    t.elapsed()
}

/// A raw varlink connection and every Rust client, each having completed a
/// call, stay idle for longer than the broker's timeout and then call again
/// without doing anything: success. Then the broker restarts between calls:
/// each client reconnects once by itself.
#[test]
fn long_lived_clients_outlive_every_timeout_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let policy_path = policy(dir.path(), "");
    let grpc = dir.path().join("grpc.sock");
    let varlink = dir.path().join("io.reapd.Reaper");
    let mut broker = spawn_reapd(dir.path(), &policy_path, "first.log", &["--idle-timeout-ms", "300"]);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut async_client = runtime.block_on(reapd_client::Client::connect(&grpc)).unwrap();
    let mut blocking = reapd_client::blocking::Client::connect(&grpc).unwrap();
    let mut vclient = VarlinkClient::connect(&varlink).unwrap();
    let mut raw = UnixStream::connect(&varlink).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let caps = message(json!({"method": "io.reapd.Reaper.GetCapabilities"}));
    let call_all = |async_client: &mut reapd_client::Client,
                    blocking: &mut reapd_client::blocking::Client,
                    vclient: &mut VarlinkClient| {
        runtime
            .block_on(async_client.capabilities())
            .expect("async gRPC client");
        blocking.capabilities().expect("blocking gRPC client");
        vclient.capabilities().expect("varlink client");
    };
    call_all(&mut async_client, &mut blocking, &mut vclient);
    raw.write_all(&caps).unwrap();
    assert!(read_reply(&mut raw).is_some());

    // Longer than the timeout (twice, to be sure), measured by the broker.
    wait_until_the_timeout_has_passed(&varlink);
    let waited = wait_until_the_timeout_has_passed(&grpc);
    assert!(waited >= Duration::from_millis(250), "timeout fired after {waited:?}");

    call_all(&mut async_client, &mut blocking, &mut vclient);
    raw.write_all(&caps).unwrap();
    assert!(read_reply(&mut raw).is_some(), "the idle raw connection was closed");
    assert_eq!(
        blocking.reconnects() + vclient.reconnects() + async_client.reconnects(),
        0
    );

    // Restart between calls.
    let stopped_in = sigterm_and_wait(&mut broker);
    eprintln!("broker with four idle long-lived clients stopped in {stopped_in:?}");
    assert!(stopped_in < Duration::from_secs(5), "stop took {stopped_in:?}");
    let mut broker = spawn_reapd(dir.path(), &policy_path, "second.log", &["--idle-timeout-ms", "300"]);
    call_all(&mut async_client, &mut blocking, &mut vclient);
    assert_eq!(async_client.reconnects(), 1);
    assert_eq!(blocking.reconnects(), 1);
    assert_eq!(vclient.reconnects(), 1);
    sigterm_and_wait(&mut broker);
}

/// SIGTERM while a kill runs whose client has hung up: the broker waits for
/// the kill, writes exactly one outcome record, then exits; exactly one
/// decision record per request.
#[test]
fn sigterm_mid_kill_with_the_client_gone_writes_one_outcome_record() {
    let mut broker = start("", &[]);
    let mut target = victim(Creds::uid(A), 16 * MIB);
    let freezer = Freezer::new("reapd-sigterm");
    freezer.freeze(target.pid);
    // Frozen, the victim never exits: `--wait 3000` keeps the kill running.
    let mut ctl = Command::new(bin("reapctl"))
        .arg("--socket")
        .arg(&broker.grpc)
        .args(["kill", &target.pid.to_string(), "--wait", "3000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_log(
        &broker.log,
        &format!("target_pid={}", target.pid),
        Duration::from_secs(5)
    ));
    ctl.kill().unwrap();
    ctl.wait().unwrap();
    let t = Instant::now();
    assert_eq!(broker.stop(), Some(0), "{}", broker.log_text());
    let stop = t.elapsed();
    let log = broker.log_text();
    let pid = format!("target_pid={}", target.pid);
    let outcomes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"outcome\"") && l.contains(&pid))
        .collect();
    assert_eq!(outcomes.len(), 1, "{log}");
    assert!(outcomes[0].contains("exited=false"), "{}", outcomes[0]);
    let decisions = log
        .lines()
        .filter(|l| l.contains("event=\"decision\"") && l.contains(&pid))
        .count();
    assert_eq!(decisions, 1, "{log}");
    eprintln!("stop with a kill in flight took {stop:?}");
    assert!(stop < Duration::from_secs(12));
    freezer.thaw();
    assert_eq!(target.wait(), Some(libc::SIGKILL));
}

/// A rate-limited kill writes one decision record, with the final verdict.
#[test]
fn a_rate_limited_kill_has_one_decision_record() {
    let broker = start("[limits]\nkills = 1\ninterval-secs = 100.0\nburst = 1\n", &[]);
    let first = victim(Creds::uid(A), 0);
    let second = victim(Creds::uid(A), 0);
    assert_eq!(broker.reapctl(Creds::uid(A), &["kill", &first.pid.to_string()]).code, 0);
    let r = broker.reapctl(Creds::uid(A), &["kill", &second.pid.to_string()]);
    assert_eq!(r.code, 8, "{r:?}");
    let log = broker.log_text();
    let pid = format!("target_pid={}", second.pid);
    let decisions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"decision\"") && l.contains(&pid))
        .collect();
    assert_eq!(decisions.len(), 1, "{log}");
    assert!(decisions[0].contains("allowed=false") && decisions[0].contains("rule=rate-limit"));
    assert!(second.running());
}

/// A CheckPermission flood from one uid alongside 100 kills from another:
/// every kill has its decision and outcome record; the flood's records are
/// capped per second and summarised.
#[test]
fn a_check_flood_never_crowds_out_kill_records() {
    let broker = start("[limits]\nkills = 1000\nburst = 1000\nmax-in-flight = 64\n", &[]);
    let flood: Vec<_> = (0..3)
        .map(|_| {
            let path = socket(&broker);
            std::thread::spawn(move || {
                let mut client = VarlinkClient::connect(path).unwrap();
                let t = Instant::now();
                let mut calls = 0u64;
                while t.elapsed() < Duration::from_secs(3) {
                    let _ = client.check_permission(Target::pid(1));
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let victims: Vec<Victim> = (0..100).map(|_| victim(Creds::uid(B), 0)).collect();
    let mut client = VarlinkClient::connect(socket(&broker)).unwrap();
    for v in &victims {
        client.kill_and_reap(Target::pid(v.pid), None).expect("kill");
    }
    let checks: u64 = flood.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(wait_for_log(
        &broker.log,
        "event=\"check_suppressed\"",
        Duration::from_secs(5)
    ));
    let log = broker.log_text();
    for v in &victims {
        let pid = format!("target_pid={} ", v.pid);
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("event=\"outcome\"") && l.contains(&pid))
                .count(),
            1,
            "outcome record of {}",
            v.pid
        );
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("event=\"decision\"") && l.contains("action=\"kill\"") && l.contains(&pid))
                .count(),
            1,
            "decision record of {}",
            v.pid
        );
    }
    let check_records = count(&log, "action=\"check\"");
    eprintln!("{checks} checks in 3 s wrote {check_records} check records");
    // 20 a second for the flood's uid (root), over ~3-4 windows, plus summaries.
    assert!(check_records < 200, "{check_records} check records for {checks} checks");
}

/// Connections from many uids at their caps fill the broker's ordinary
/// capacity: root and a caller holding a kill grant are still served fast
/// from the reserve; an ordinary uid is refused.
#[test]
fn a_connection_flood_leaves_room_for_root_and_grantees() {
    let text = format!(
        "[[rule]]\nname = \"oom-manager\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [\"{GRANTED}\"]\ntarget.uids = [\"61000-61999\"]\n"
    );
    let broker = start(
        &text,
        &[
            "--max-connections",
            "64",
            "--max-connections-per-uid",
            "8",
            "--reserved-connections",
            "8",
        ],
    );
    // 7 uids x 8 connections = 56 = the ordinary capacity (64 - 8): each
    // uid's child opens 8 connections, says so, and holds them.
    let script = "import socket,sys,time\nss=[socket.socket(socket.AF_UNIX) for _ in range(8)]\n\
                  [s.connect(sys.argv[1]) for s in ss]\nprint('held',flush=True)\ntime.sleep(120)\n";
    let mut children: Vec<Child> = (0..7u32)
        .map(|i| {
            let mut command = Command::new("python3");
            command
                .arg("-c")
                .arg(script)
                .arg(socket(&broker))
                .stdout(Stdio::piped());
            spawn_as(Creds::uid(61300 + i), &[], &mut command)
        })
        .collect();
    for child in &mut children {
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.as_mut().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "held");
    }
    // An ordinary uid is refused: the connection is closed at once.
    let ordinary = reapd_e2e::run_as(
        Creds::uid(A),
        Command::new(bin("reapctl"))
            .arg("--varlink")
            .arg("--socket")
            .arg(socket(&broker))
            .arg("caps"),
    );
    assert_ne!(ordinary.status.code(), Some(0), "an ordinary uid got a reserved slot");
    assert!(wait_for_log(
        &broker.log,
        "over the connection limit",
        Duration::from_secs(2)
    ));
    // Root and the grantee are served, fast: connect, call, answer.
    let target = victim(Creds::uid(A), 0);
    let t = Instant::now();
    let permission = VarlinkClient::connect(socket(&broker))
        .and_then(|mut c| c.check_permission(Target::pid(target.pid)))
        .expect("root is served");
    let root_took = t.elapsed();
    assert!(permission.allowed);
    let mut command = Command::new(bin("reapctl"));
    command
        .arg("--varlink")
        .arg("--socket")
        .arg(socket(&broker))
        .arg("--json")
        .args(["check", &target.pid.to_string()]);
    let t = Instant::now();
    let out = reapd_e2e::run_as(Creds::uid(GRANTED), &mut command);
    let granted_took = t.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "grantee: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("with the ordinary capacity full: root served in {root_took:?}, the grantee (reapctl, process start included) in {granted_took:?}");
    assert!(root_took < Duration::from_millis(100), "root took {root_took:?}");
    assert!(
        granted_took < Duration::from_millis(100),
        "grantee took {granted_took:?}"
    );
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Threads of `pid` named `name` that are blocked (FUSE waits first
/// interruptibly, S, then uninterruptibly, D, once a signal came).
fn threads_blocked(pid: i32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                .filter(|stat| {
                    let comm = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')'));
                    matches!(comm, Some((c, rest)) if c == name && rest.trim_start().starts_with(['S', 'D']))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A FUSE filesystem that never answers FLUSH; a uid passes fds of its file
/// with varlink calls. The broker answers each call at once, closes the fds
/// on closer threads that hang (in the kernel, not on the runtime), refuses
/// that uid's further fd-carrying calls once its budget is used, and answers
/// another uid within 100 ms on both transports. On SIGTERM it stops
/// serving and writes "stopped" at once; the process itself is gone as soon
/// as the FUSE server is.
#[test]
fn a_fuse_fd_that_never_flushes_costs_only_its_sender() {
    let broker = start("", &[]);
    let mountdir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mountdir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let budget = 8; // reapd::transport::closer::PER_UID
    let mut fuse = {
        use std::os::unix::process::CommandExt;
        Command::new(bin("fuse-noflush"))
            .arg(mountdir.path())
            .arg(socket(&broker))
            .arg(A.to_string())
            .arg((budget + 1).to_string())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let group = fuse.id() as i32;
    let kill_fuse = move || {
        unsafe_kill(-group, libc::SIGKILL);
    };
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(fuse.stdout.take().unwrap()));
    let mut replies = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(reason) = line.strip_prefix("SKIP: ") {
            kill_fuse();
            let _ = fuse.wait();
            skip(reason);
            return;
        }
        if line == "done" {
            break;
        }
        replies.push(line);
    }
    let mut broker = broker;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(replies.len(), budget + 1, "{replies:?}");
        for reply in &replies[..budget] {
            assert_eq!(reply, "reply org.varlink.service.InvalidParameter", "{replies:?}");
        }
        assert_eq!(replies[budget], "reply io.reapd.Reaper.RateLimited", "{replies:?}");
        // The closes hang where they should: on closer threads, in the kernel.
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads_blocked(broker.pid(), "reapd-closer") < budget {
            assert!(
                Instant::now() < deadline,
                "closer threads: {}",
                threads_blocked(broker.pid(), "reapd-closer")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Another uid, both transports: served within 100 ms.
        let other = victim(Creds::uid(B), 0);
        let t = Instant::now();
        let mut command = Command::new(bin("reapctl"));
        command
            .arg("--varlink")
            .arg("--socket")
            .arg(socket(&broker))
            .args(["check", &other.pid.to_string()]);
        let out = reapd_e2e::run_as(Creds::uid(B), &mut command);
        let varlink_took = t.elapsed();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let t = Instant::now();
        let r = broker.reapctl(Creds::uid(B), &["check", &other.pid.to_string()]);
        let grpc_took = t.elapsed();
        assert_eq!(r.code, 0, "{r:?}");
        eprintln!(
            "with {budget} closes hung on FUSE FLUSH: uid {B} answered in {varlink_took:?} (varlink), {grpc_took:?} (gRPC), reapctl start included"
        );
        assert!(varlink_took < Duration::from_millis(100) && grpc_took < Duration::from_millis(100));
        // The sender's pid-named calls still work; only fds are refused.
        // SIGTERM: serving stops and the broker says so at once.
        let t = Instant::now();
        unsafe_kill(broker.pid(), libc::SIGTERM);
        assert!(
            wait_for_log(&broker.log, "stopped", Duration::from_secs(3)),
            "{}",
            broker.log_text()
        );
        eprintln!("SIGTERM to \"stopped\": {:?}", t.elapsed());
    }));
    // The kernel holds the process until the hung FLUSHes end: they end
    // when the FUSE server goes away.
    kill_fuse();
    let _ = fuse.wait();
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        if let Ok(Some(status)) = broker.child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(exited.is_some(), "broker still there after the FUSE server died");
    eprintln!("broker process gone {:?} after the FUSE server", t.elapsed());
}

/// The gRPC socket never carries fds: the kernel refuses them to the sender
/// (SO_PASSRIGHTS off, Linux 6.16+), so none is ever queued for the broker.
#[test]
fn the_grpc_socket_refuses_passed_fds() {
    let broker = start("", &[]);
    if !broker.log_text().contains("gRPC socket refuses passed fds") {
        skip("the kernel has no SO_PASSRIGHTS (Linux 6.16)");
        return;
    }
    let stream = UnixStream::connect(&broker.grpc).unwrap();
    let (r, _w) = {
        let mut fds = [0; 2];
        // SAFETY: fds is a live 2-int array; both fds are new and owned here.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        unsafe {
            (
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
            )
        }
    };
    let raw = r.as_raw_fd();
    // SAFETY: sendmsg with a control buffer for one int; live local data.
    let (sent, errno) = unsafe {
        let bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut control = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::copy_nonoverlapping(&raw, libc::CMSG_DATA(cmsg) as *mut i32, 1);
        let sent = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        (sent, std::io::Error::last_os_error().raw_os_error())
    };
    assert_eq!((sent, errno), (-1, Some(libc::EPERM)));
    // Callers are served as ever.
    assert_eq!(broker.reapctl(Creds::uid(A), &["caps"]).code, 0);
}

/// Under socket activation, a client holding a connection (an OOM manager)
/// keeps the broker running past its idle exit and past the slow-loris
/// timeout, so it never pays a cold start; once it hangs up, the broker
/// exits. Measures the cold start such a client would otherwise pay.
#[test]
fn a_held_connection_keeps_a_socket_activated_broker_warm() {
    use std::os::unix::net::UnixListener;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let policy_path = policy(dir.path(), "");
    let socket = dir.path().join("grpc.sock");
    // The test plays systemd: it owns the listening socket.
    let listener = UnixListener::bind(&socket).unwrap();
    let activate = || {
        let fd = listener.as_raw_fd();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(bin("reapd"))
            .arg("--grpc-socket")
            .arg(dir.path().join("unused.sock"))
            .arg("--policy")
            .arg(&policy_path)
            .args(["--idle-exit-secs=1", "--idle-timeout-ms=300"])
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "grpc")
            .env("REAPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("reapd.log")).unwrap());
        // SAFETY: dup2/fcntl only, before exec.
        unsafe {
            command.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        KillOnDrop(command.spawn().unwrap())
    };
    let wait_exit = |child: &mut Child, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    };
    // Cold: the client connects while no broker runs; the broker starts.
    let t = Instant::now();
    let mut broker = activate();
    let mut client = reapd_client::blocking::Client::connect(&socket).unwrap();
    client.capabilities().unwrap();
    let cold = t.elapsed();
    // Held and idle well past the idle exit (1 s) and the timeout (0.3 s).
    assert!(
        wait_exit(&mut broker, Duration::from_secs(3)).is_none(),
        "the broker exited under a held connection"
    );
    let t = Instant::now();
    client.capabilities().unwrap();
    let warm = t.elapsed();
    assert_eq!(client.reconnects(), 0);
    eprintln!("first call with a broker start (cold): {cold:?}; on the held connection after 3 s idle: {warm:?}");
    drop(client);
    let status = wait_exit(&mut broker, Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "no idle exit once the client left"
    );
}
