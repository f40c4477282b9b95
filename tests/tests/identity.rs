// SPDX-License-Identifier: MIT OR Apache-2.0
//! Authority never wider than kill(2) plus explicit grants (issue 10): pid
//! namespaces, threads, forgeable cgroup names, unverifiable facts, hostile
//! command names. Real namespaces, real threads, real cgroups, real uids.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use reapd_e2e::{
    bin, kernel_allows_kill, policy_file, reapctl_in, start_with_policy, top, varlink_call_as, varlink_socket, Broker,
    CgroupTree, Creds, TestCgroup, Value, Victim,
};

/// Runs `ns-caller ARGS`: a client in a fresh pid namespace beside its own
/// victim. Returns the client's output and the victim's fate.
struct NsRun {
    output: String,
    victim_ns_pid: i32,
    victim_signal: i32,
}

impl NsRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.output).unwrap_or(Value::Null)
    }
}

fn ns_caller(args: &[&str]) -> NsRun {
    let out = Command::new(bin("ns-caller"))
        .args(args)
        .output()
        .expect("run ns-caller");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (output, tail) = stdout
        .rsplit_once("ns-caller: ")
        .unwrap_or_else(|| panic!("ns-caller failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let field = |name: &str| -> i32 {
        tail.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {tail}"))
    };
    NsRun {
        output: output.trim().to_string(),
        victim_ns_pid: field("victim"),
        victim_signal: field("signal"),
    }
}

fn varlink_path(broker: &Broker) -> String {
    varlink_socket(broker).to_string_lossy().into_owned()
}

/// The broker can name the victims in these tests only if the kernel has
/// the pid-namespace translation ioctls (6.11); probed, not assumed.
fn pidns_translation_supported() -> bool {
    let ns = std::fs::File::open("/proc/self/ns/pid").unwrap();
    // NS_GET_PID_IN_PIDNS of ourselves in our own namespace.
    let request = (2u64 << 30) | (4 << 16) | (0xb7 << 8) | 0x8;
    // SAFETY: the ioctl takes a pid by value.
    let ret = unsafe {
        libc::ioctl(
            ns.as_raw_fd(),
            request as libc::c_ulong,
            std::process::id() as libc::c_ulong,
        )
    };
    ret == std::process::id() as i32
}

/// Skips the test (visibly, counted by scripts/test.sh) unless `$cond`.
macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            reapd_e2e::skip(module_path!(), &$why);
            return;
        }
    };
}

const NS_UID: u32 = 61200;

#[test]
fn namespaced_caller_kills_its_own_child_not_the_host_process_with_that_number() {
    require!(pidns_translation_supported(), "no NS_GET_*_PIDNS ioctls (Linux < 6.11)");
    let broker = Broker::start();
    let host = Victim::spawn(Creds::uid(NS_UID), 0);
    let h = host.pid.to_string();
    let run = ns_caller(&[
        "--uid",
        &NS_UID.to_string(),
        "--victim-uid",
        &NS_UID.to_string(),
        "--victim-bytes",
        "4194304",
        "--last-pid",
        &h,
        "--varlink",
        &varlink_path(&broker),
        "--pidns",
    ]);
    assert_eq!(
        run.victim_ns_pid, host.pid,
        "the namespace victim did not get the colliding pid"
    );
    let reply = run.json();
    // A running victim may finish its own exit before the reap: both mean
    // the kill reached it.
    let outcome = reply["parameters"]["outcome"].as_str().unwrap_or_default();
    assert!(matches!(outcome, "reaped" | "exited_before_reap"), "{reply}");
    // The reply speaks the caller's pid namespace.
    assert_eq!(reply["parameters"]["target"]["pid"], host.pid, "{reply}");
    assert_eq!(run.victim_signal, libc::SIGKILL, "the caller's own child must die");
    assert!(host.running(), "the host process with the same number must live");
}

#[test]
fn namespaced_caller_that_cannot_prove_its_namespace_is_refused_with_the_fact_named() {
    let broker = Broker::start();
    let host = Victim::spawn(Creds::uid(NS_UID), 0);
    let h = host.pid.to_string();
    let reapctl = bin("reapctl");
    let run = ns_caller(&[
        "--uid",
        &NS_UID.to_string(),
        "--victim-uid",
        &NS_UID.to_string(),
        "--last-pid",
        &h,
        "--",
        reapctl.to_str().unwrap(),
        "--socket",
        broker.grpc.to_str().unwrap(),
        "--json",
        "kill",
        "{victim}",
    ]);
    let reply = run.json();
    assert_eq!(reply["error"], "permission_denied", "{}", run.output);
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("unverified fact: the caller's pid namespace"),
        "{reply}"
    );
    assert_eq!(run.victim_signal, 0);
    assert!(host.running());
    // The same over varlink without `pidns`.
    let run = ns_caller(&[
        "--uid",
        &NS_UID.to_string(),
        "--victim-uid",
        &NS_UID.to_string(),
        "--last-pid",
        &h,
        "--varlink",
        &varlink_path(&broker),
    ]);
    assert_eq!(
        run.json()["error"],
        "io.reapd.Reaper.PermissionDenied",
        "{}",
        run.output
    );
    assert_eq!(run.victim_signal, 0);
    assert!(host.running());
}

#[test]
fn a_pidfd_of_a_process_outside_the_callers_pid_namespace_is_not_found() {
    require!(pidns_translation_supported(), "no NS_GET_*_PIDNS ioctls (Linux < 6.11)");
    let broker = Broker::start();
    let host = Victim::spawn(Creds::uid(NS_UID), 0);
    let run = ns_caller(&[
        "--uid",
        &NS_UID.to_string(),
        "--victim-uid",
        &NS_UID.to_string(),
        "--host-pidfd",
        &host.pid.to_string(),
        "--varlink",
        &varlink_path(&broker),
        "--pidns",
    ]);
    assert_eq!(run.json()["error"], "io.reapd.Reaper.NoSuchProcess", "{}", run.output);
    assert!(host.running());
    // A namespace fd that is not the caller's own (the host's, from before
    // the unshare, is above it) is refused too: tested by the depth check in
    // target::verify_caller_pidns; here the caller passes the right one.
}

/// The kill(2) oracle from inside a child pid namespace: for each caller uid
/// and victim uid, CheckPermission (with the caller's namespace passed)
/// agrees with `kill(pid, 0)` issued from the same namespace, for the
/// namespace's own victim and for a host pid number it cannot see.
#[test]
fn check_permission_agrees_with_kill_2_from_inside_a_pid_namespace() {
    require!(pidns_translation_supported(), "no NS_GET_*_PIDNS ioctls (Linux < 6.11)");
    let broker = Broker::start();
    let sock = varlink_path(&broker);
    let host = Victim::spawn(Creds::uid(61211), 0);
    let mut disagreements = Vec::new();
    for caller in [61210u32, 61211] {
        for victim in [61210u32, 61211, 0] {
            for outside in [false, true] {
                let (c, v) = (caller.to_string(), victim.to_string());
                let mut base = vec!["--uid", &c, "--victim-uid", &v];
                let h = (host.pid + 7).to_string();
                if outside {
                    // A number that names nothing in the namespace but a
                    // host process of the caller's uid.
                    base.extend(["--target-pid", &h]);
                }
                let mut check = base.clone();
                check.extend(["--varlink", &sock, "--pidns", "--check"]);
                let answer = ns_caller(&check).json();
                let broker_allows = answer["parameters"]["allowed"] == true;
                let target = if outside { h.clone() } else { "{victim}".to_string() };
                let script = format!("kill -0 {target} 2>/dev/null && echo yes || echo no");
                let mut oracle = base.clone();
                oracle.extend(["--", "/bin/sh", "-c", &script]);
                let kernel_allows = ns_caller(&oracle).output == "yes";
                if broker_allows != kernel_allows {
                    disagreements.push(format!(
                        "caller {caller} victim {victim} outside {outside}: broker {answer} kernel {kernel_allows}"
                    ));
                }
            }
        }
    }
    assert!(host.running());
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

/// A root process one of whose threads switched to another uid with the raw
/// syscall (glibc would switch them all): started with python3.
struct MixedCredProcess {
    child: std::process::Child,
    thread_tid: i32,
}

impl MixedCredProcess {
    fn spawn(thread_uid: u32) -> Option<MixedCredProcess> {
        let script = format!(
            "import ctypes, os, sys, threading\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             ready = threading.Event()\n\
             def worker():\n\
             \x20   libc.prctl(15, b'worker', 0, 0, 0)\n\
             \x20   assert libc.syscall(117, {thread_uid}, {thread_uid}, {thread_uid}) == 0\n\
             \x20   print(threading.get_native_id(), flush=True)\n\
             \x20   threading.Event().wait()\n\
             threading.Thread(target=worker, daemon=True).start()\n\
             sys.stdin.read()\n"
        );
        if std::env::consts::ARCH != "x86_64" {
            return None;
        }
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut()?), &mut line).ok()?;
        let thread_tid = line.trim().parse().ok()?;
        Some(MixedCredProcess { child, thread_tid })
    }
}

impl Drop for MixedCredProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn thread_pidfd(tid: i32) -> Option<OwnedFd> {
    // PIDFD_THREAD is O_EXCL (Linux 6.9).
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, libc::O_EXCL) };
    // SAFETY: a new fd we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[test]
fn threads_are_never_targets_and_decisions_use_the_process_credentials() {
    const T: u32 = 61220;
    let broker = Broker::start();
    let Some(mut mixed) = MixedCredProcess::spawn(T) else {
        reapd_e2e::skip("threads", "python3 on x86_64 needed for the mixed-credential process");
        return;
    };
    let pid = mixed.child.id() as i32;
    let sock = varlink_socket(&broker);
    // By its tgid: the process is root's; kill(2) refuses uid T, so must we.
    assert!(!kernel_allows_kill(Creds::uid(T), pid));
    let r = broker.reapctl(Creds::uid(T), &["kill", &pid.to_string()]);
    assert_eq!(r.code, 6, "{r:?}");
    // By the thread's TID: not a process.
    let r = broker.reapctl(Creds::uid(T), &["kill", &mixed.thread_tid.to_string()]);
    assert_eq!(r.code, 4, "{r:?}");
    // By a thread pidfd: not a process either.
    match thread_pidfd(mixed.thread_tid) {
        Some(fd) => {
            let reply = varlink_call_as(
                Creds::uid(T),
                &sock,
                r#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pidfd":0}}"#,
                &[fd.as_raw_fd()],
            );
            assert_eq!(reply["error"], "org.varlink.service.InvalidParameter", "{reply}");
        }
        None => reapd_e2e::skip("threads", "PIDFD_THREAD (Linux < 6.9): thread pidfd case"),
    }
    assert!(
        matches!(mixed.child.try_wait(), Ok(None)),
        "the mixed process must live"
    );

    // The broker's own threads, by root: refused, the broker lives.
    let broker_tid: i32 = std::fs::read_dir(format!("/proc/{}/task", broker.pid()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|tid| *tid != broker.pid())
        .expect("the broker has threads");
    let r = broker.reapctl(Creds::ROOT, &["kill", &broker_tid.to_string()]);
    assert_eq!(r.code, 4, "{r:?}");
    if let Some(fd) = thread_pidfd(broker_tid) {
        let reply = varlink_call_as(
            Creds::ROOT,
            &sock,
            r#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pidfd":0}}"#,
            &[fd.as_raw_fd()],
        );
        assert_eq!(reply["error"], "org.varlink.service.InvalidParameter", "{reply}");
    }
    assert!(std::path::Path::new(&format!("/proc/{}", broker.pid())).exists());
    assert_eq!(
        broker.reapctl(Creds::ROOT, &["caps"]).code,
        0,
        "the broker must still answer"
    );
}

/// Makes `cg` look delegated to `uid` the way systemd's `Delegate=yes`
/// does: the directory and its `cgroup.procs` chowned to the user.
fn delegate(cg: &TestCgroup, uid: u32) {
    std::os::unix::fs::chown(&cg.dir, Some(uid), Some(uid)).unwrap();
    std::os::unix::fs::chown(cg.dir.join("cgroup.procs"), Some(uid), Some(uid)).unwrap();
}

#[test]
fn unit_names_made_in_a_delegated_subtree_neither_grant_nor_protect() {
    const U: u32 = 61230;
    const W: u32 = 61231;
    let t = top("forged");
    let _tree = CgroupTree::new(&t);
    let forged = TestCgroup::new(&format!("{t}/user.slice/user@{U}.service/earlyoom.service"));
    delegate(&TestCgroup::new(&format!("{t}/user.slice/user@{U}.service")), U);
    delegate(&forged, U);
    let real = TestCgroup::new(&format!("{t}/system.slice/earlyoom.service"));
    let forged_sshd = TestCgroup::new(&format!("{t}/user.slice/user@{U}.service/sshd.service"));
    delegate(&forged_sshd, U);
    let real_sshd = TestCgroup::new(&format!("{t}/system.slice/sshd.service"));
    let policy = policy_file(
        r#"
[protect]
units = ["sshd.service"]

[[rule]]
name = "earlyoom-kills-w"
actions = ["kill-and-reap"]
caller.units = ["earlyoom.service"]
target.uids = [61231]
"#,
    );
    let broker = start_with_policy(&policy);
    let victim = Victim::spawn(Creds::uid(W), 0);
    let r = reapctl_in(
        &broker,
        Some(&forged),
        Creds::uid(U),
        &["check", &victim.pid.to_string()],
    );
    assert_eq!(r.code, 1, "a forged unit must not grant: {r:?}");
    let r = reapctl_in(&broker, Some(&real), Creds::uid(U), &["check", &victim.pid.to_string()]);
    assert_eq!(r.code, 0, "the root-made unit grants: {r:?}");
    assert!(r.json.to_string().contains("earlyoom-kills-w"), "{r:?}");

    // Protections: a user's own process in its forged sshd.service is not
    // protected; a process in the root-made sshd.service is.
    let hiding = Victim::spawn(Creds::uid(U), 0);
    forged_sshd.add(hiding.pid);
    let r = broker.reapctl(Creds::uid(U), &["check", &hiding.pid.to_string()]);
    assert_eq!(r.code, 0, "a forged sshd.service must not protect: {r:?}");
    let sshd = Victim::spawn(Creds::uid(U), 0);
    real_sshd.add(sshd.pid);
    let r = broker.reapctl(Creds::uid(U), &["check", &sshd.pid.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.json
            .to_string()
            .contains("protected by the policy (unit sshd.service)"),
        "{r:?}"
    );
}

/// 1000 callers in a sandbox cgroup each connect, send a kill and exit at
/// once, racing the broker's reading of their cgroup: the deny rule on the
/// sandbox must hold every time (unverifiable means denied).
#[test]
fn racing_connect_and_exit_callers_never_escape_a_caller_cgroup_deny_rule() {
    const U: u32 = 61240;
    const ROUNDS: usize = 1000;
    let t = top("race");
    let _tree = CgroupTree::new(&t);
    let sandbox = TestCgroup::new(&format!("{t}/sandbox"));
    let policy = policy_file(&format!(
        "[limits]\nkills = 100000\nburst = 100000\nmax-in-flight = 1000\n\n[[rule]]\nname = \"sandboxed\"\neffect = \"deny\"\nactions = [\"kill-and-reap\"]\ncaller.cgroups = [\"/{t}/sandbox\"]\ntarget.any = true\n"
    ));
    let broker = start_with_policy(&policy);
    let victim = Victim::spawn(Creds::uid(U), 0);
    let sock = std::ffi::CString::new(varlink_socket(&broker).into_os_string().into_encoded_bytes()).unwrap();
    let procs = std::ffi::CString::new(sandbox.dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
    let message = format!(
        "{{\"method\":\"io.reapd.Reaper.KillAndReap\",\"parameters\":{{\"pid\":{}}}}}\0",
        victim.pid
    );
    for _ in 0..ROUNDS {
        // SAFETY: the child makes raw syscalls only and _exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(90);
                }
                libc::close(fd);
                if libc::syscall(libc::SYS_setresgid, U, U, U) != 0 || libc::syscall(libc::SYS_setresuid, U, U, U) != 0
                {
                    libc::_exit(91);
                }
                let sock_fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
                for (i, b) in sock.as_bytes().iter().enumerate() {
                    addr.sun_path[i] = *b as libc::c_char;
                }
                let len = std::mem::size_of::<libc::sa_family_t>() + sock.as_bytes().len() + 1;
                if libc::connect(
                    sock_fd,
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    len as u32,
                ) == 0
                {
                    libc::write(sock_fd, message.as_ptr().cast(), message.len());
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "racer failed: {status}"
        );
    }
    // Every call is recorded: its own decision record, or (over the per-uid
    // record rate, as a refusal flood is) counted in a refusal_suppressed
    // summary. Wait for all of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = |text: &str| {
        let records = text
            .lines()
            .filter(|l| l.contains("event=\"decision\"") && l.contains("action=\"kill\""))
            .count();
        let suppressed: usize = text
            .lines()
            .filter(|l| l.contains("refusal_suppressed") && l.contains("action=\"kill\""))
            .filter_map(|l| {
                l.split("suppressed=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        records + suppressed
    };
    while count(&broker.log_text()) < ROUNDS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = broker.log_text();
    let allowed = log
        .lines()
        .filter(|l| l.contains("decision") && l.contains("allowed=true"))
        .count();
    assert_eq!(allowed, 0, "escapes: {allowed}");
    assert!(victim.running(), "the victim must live");
    assert!(
        count(&log) >= ROUNDS * 9 / 10,
        "only {} of {ROUNDS} calls decided",
        count(&log)
    );
}

#[test]
fn processes_with_non_utf8_names_are_killed_and_reported_escaped() {
    let broker = Broker::start();
    let cases: [(&'static [u8], &str); 2] = [
        (b"\xff\xfe", r"\xff\xfe"),
        // Eight Cyrillic letters: the kernel keeps 15 bytes, cutting the last.
        ("жжжжжжжж".as_bytes(), r"жжжжжжж\xd0"),
    ];
    for (name, shown) in cases {
        let mut victim = Victim::spawn_named(Creds::uid(61250), 1 << 20, Some(name));
        let r = broker.reapctl(Creds::uid(61250), &["kill", &victim.pid.to_string(), "--wait", "2000"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.json["target"]["comm"], shown, "{r:?}");
        assert_eq!(victim.wait(), Some(libc::SIGKILL));
        // Root too (the path every caller shares).
        let victim = Victim::spawn_named(Creds::uid(61250), 0, Some(name));
        let r = broker.reapctl(Creds::ROOT, &["check", &victim.pid.to_string()]);
        assert_eq!(r.code, 0, "{r:?}");
    }
    // The log never carries the raw bytes.
    assert!(!broker.log_text().contains('\u{fffd}'));
}

/// Root of a user namespace with several mapped uids may kill(2) that
/// namespace's processes (CAP_KILL in the target's user namespace). The
/// broker does not grant that authority (it cannot see user namespaces with
/// CAP_KILL alone): a documented refusal, which names the reason.
#[test]
fn user_namespace_root_gets_a_documented_refusal_where_kill_2_would_allow() {
    const BASE: u32 = 61300;
    let broker = Broker::start();
    let reapctl = bin("reapctl");
    let victim_uid = "5";
    let kernel = ns_caller(&[
        "--userns",
        &BASE.to_string(),
        "--victim-uid",
        victim_uid,
        "--",
        "/bin/sh",
        "-c",
        "kill -0 {victim} 2>/dev/null && echo yes || echo no",
    ]);
    require!(
        kernel.output == "yes",
        format!("user namespaces unavailable here: {}", kernel.output)
    );
    let run = ns_caller(&[
        "--userns",
        &BASE.to_string(),
        "--victim-uid",
        victim_uid,
        "--",
        reapctl.to_str().unwrap(),
        "--socket",
        broker.grpc.to_str().unwrap(),
        "--json",
        "kill",
        "{victim}",
    ]);
    let reply = run.json();
    assert_eq!(reply["error"], "permission_denied", "{}", run.output);
    assert!(reply["message"].as_str().unwrap().contains("user namespace"), "{reply}");
    assert_eq!(run.victim_signal, 0, "the broker must not kill it");
}
