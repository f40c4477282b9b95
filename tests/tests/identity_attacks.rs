// SPDX-License-Identifier: MIT OR Apache-2.0
//! Attacks on the identity fixes of issue 10, as a hostile local user
//! would make them: each test is one attack that succeeded against
//! `attack10`'s base, written as the behaviour the broker must have.
//! Real processes, real cgroups, real namespaces; waits on observable
//! state, never on time.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::Duration;

use reapd_e2e::{
    bin, policy_file, start_with_policy, top, varlink_socket, wait_for_log, Broker, CgroupTree, Creds, TestCgroup,
    Value, Victim,
};

/// Makes `cg` look delegated to `uid` the way systemd's `Delegate=yes`
/// does: the directory and its `cgroup.procs` chowned to the user.
fn delegate(cg: &TestCgroup, uid: u32) {
    std::os::unix::fs::chown(&cg.dir, Some(uid), Some(uid)).unwrap();
    std::os::unix::fs::chown(cg.dir.join("cgroup.procs"), Some(uid), Some(uid)).unwrap();
}

/// A process of `uid` that, from inside the cgroup `home` delegated to it,
/// makes a child cgroup named `name` (any bytes but `/` and `\n`) and moves
/// itself there, as any user may in its own `user@UID.service`. Killed and
/// waited for on drop.
struct SelfPlaced {
    pid: i32,
    waited: bool,
}

impl SelfPlaced {
    fn spawn(uid: u32, home: &TestCgroup, name: &[u8]) -> SelfPlaced {
        let mut dir = home.dir.as_os_str().as_bytes().to_vec();
        dir.push(b'/');
        dir.extend_from_slice(name);
        let mut procs = dir.clone();
        procs.extend_from_slice(b"/cgroup.procs");
        let dir = CString::new(dir).unwrap();
        let procs = CString::new(procs).unwrap();
        let (go_r, go_w) = pipe();
        let (ready_r, ready_w) = pipe();
        // SAFETY: the child makes raw syscalls only, on buffers prepared
        // before the fork, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                let mut byte = 0u8;
                // Wait until root has put us into our delegated home.
                if libc::read(go_r, (&mut byte as *mut u8).cast(), 1) != 1 {
                    libc::_exit(89);
                }
                if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()) != 0
                    || libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    libc::_exit(90);
                }
                // From here on: an unprivileged user in its own subtree.
                if libc::mkdir(dir.as_ptr(), 0o755) != 0 {
                    libc::_exit(91);
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(92);
                }
                libc::close(fd);
                libc::write(ready_w, b"r".as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        unsafe {
            libc::close(go_r);
            libc::close(ready_w);
        }
        home.add(pid);
        let mut byte = [0u8; 1];
        unsafe {
            libc::write(go_w, b"g".as_ptr().cast(), 1);
            libc::close(go_w);
        }
        let n = unsafe { libc::read(ready_r, byte.as_mut_ptr().cast(), 1) };
        unsafe { libc::close(ready_r) };
        assert_eq!(n, 1, "the self-placing process {pid} failed");
        SelfPlaced { pid, waited: false }
    }

    /// Waits for it; the signal that killed it, if any.
    fn wait(&mut self) -> Option<i32> {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let ret = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        self.waited = true;
        (ret == self.pid && libc::WIFSIGNALED(status)).then(|| libc::WTERMSIG(status))
    }
}

impl Drop for SelfPlaced {
    fn drop(&mut self) {
        if !self.waited {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.wait();
        }
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: fds is a live 2-int array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

/// Attack: a user names a cgroup in its own delegated subtree with bytes
/// that are not UTF-8 (`mkdir $'\xff'`) and moves itself in. The broker
/// read `/proc/PID/cgroup` as UTF-8, so the target's cgroup became
/// "unverified", and an unverified cgroup makes *every* cgroup or unit
/// protection apply: the process was refused to root, to its own user and
/// to the grant holder alike (`protect:cgroup /system.slice: unverified
/// fact`), although the part of the path that protections and grants read
/// (the trusted prefix, up to `user@UID.service`) was plain root-named
/// UTF-8. A process made itself unkillable by a name it chose.
#[test]
fn a_non_utf8_cgroup_name_in_a_delegated_subtree_does_not_make_a_process_unkillable() {
    const MONITOR: u32 = 61500;
    const U: u32 = 61501;
    let t = top("badname");
    let _tree = CgroupTree::new(&t);
    let _system = TestCgroup::new(&format!("{t}/system.slice"));
    let home = TestCgroup::new(&format!("{t}/user.slice/user-{U}.slice/user@{U}.service"));
    delegate(&home, U);
    // Worked example 2 of docs/policy.md: services are protected, a
    // monitor may kill what runs in login sessions and user managers.
    let policy = policy_file(&format!(
        r#"
[protect]
cgroups = ["/{t}/system.slice"]

[[rule]]
name = "oom-monitor"
actions = ["kill-and-reap"]
caller.uids = [{MONITOR}]
target.cgroups = ["/{t}/user.slice"]
"#
    ));
    let broker = start_with_policy(&policy);
    let mut hiding = SelfPlaced::spawn(U, &home, b"app\xff.scope");
    let cgroup = std::fs::read(format!("/proc/{}/cgroup", hiding.pid)).unwrap();
    assert!(
        cgroup.windows(4).any(|w| w == b"p\xff.s"),
        "the process is in its own oddly named cgroup"
    );
    let pid = hiding.pid.to_string();

    // Its own user and root: the kill(2) rule, no protection applies.
    let r = broker.reapctl(Creds::uid(U), &["check", &pid]);
    assert_eq!(r.code, 0, "its own user may kill it: {r:?}");
    assert_eq!(r.json["allowed"], true, "{r:?}");
    let r = broker.reapctl(Creds::ROOT, &["check", &pid]);
    assert_eq!(r.code, 0, "root may kill it: {r:?}");
    // The monitor: granted by the root-named part of the path.
    let r = broker.reapctl(Creds::uid(MONITOR), &["kill", &pid, "--wait", "5000"]);
    assert_eq!(r.code, 0, "the grant holder may kill it: {r:?}");
    assert_eq!(hiding.wait(), Some(libc::SIGKILL));
}

/// Attack: a process names itself `x allowed=true` (14 bytes, any user may
/// `prctl(PR_SET_NAME)`), and the default text audit log writes comms
/// unquoted: the decision record then reads `target_comm=x allowed=true
/// ... allowed=false`, and any key=value reader of the audit trail (logfmt,
/// SIEM field extraction) takes the forged field. Comms are escaped for
/// control characters but not for the field separator.
#[test]
fn a_command_name_cannot_forge_a_field_of_the_audit_record() {
    const U: u32 = 61510;
    const OTHER: u32 = 61511;
    let broker = Broker::start();
    let victim = Victim::spawn_named(Creds::uid(U), 0, Some(b"x allowed=true"));
    // Another user is refused: the record says allowed=false.
    let r = broker.reapctl(Creds::uid(OTHER), &["kill", &victim.pid.to_string()]);
    assert_eq!(r.code, 6, "{r:?}");
    let needle = format!("target_pid={} ", victim.pid);
    assert!(wait_for_log(&broker.log, &needle, Duration::from_secs(10)));
    let log = broker.log_text();
    let record = log
        .lines()
        .find(|l| l.contains(&needle) && l.contains("event=\"decision\""))
        .unwrap_or_else(|| panic!("no decision record for the victim:\n{log}"));
    // Split the record as a key=value reader would (outside quotes).
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut in_quotes = false;
    let mut token = String::new();
    for ch in record.chars().chain(std::iter::once(' ')) {
        match ch {
            '"' => {
                in_quotes = !in_quotes;
                token.push(ch);
            }
            ' ' if !in_quotes => {
                if let Some((k, v)) = token.split_once('=') {
                    fields.push((k.to_string(), v.to_string()));
                }
                token.clear();
            }
            _ => token.push(ch),
        }
    }
    let allowed: Vec<&str> = fields
        .iter()
        .filter(|(k, _)| k == "allowed")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(allowed, ["false"], "a forged field in the audit record: {record}");
    assert!(victim.running());
}

/// Runs `ns-caller ARGS` and returns its client's reply (first line).
fn ns_caller_reply(args: &[&str]) -> Value {
    let out = Command::new(bin("ns-caller"))
        .args(args)
        .output()
        .expect("run ns-caller");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (reply, _) = stdout
        .rsplit_once("ns-caller: ")
        .unwrap_or_else(|| panic!("ns-caller failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    serde_json::from_str(reply.trim()).unwrap_or(Value::Null)
}

/// Attack: a caller in a child pid namespace passes, as `pidns`, a
/// namespace that is not its own (here its parent's, opened before the
/// unshare: with it every host pid would resolve). The broker refuses,
/// rightly, but blames the `pid` parameter, so a client cannot tell its
/// target from its namespace proof, and the documented contract ("pidns is
/// verified") has no error that names it.
#[test]
fn a_wrong_pidns_fd_is_blamed_on_pidns_not_on_the_pid() {
    let broker = Broker::start();
    let sock = varlink_socket(&broker).to_string_lossy().into_owned();
    for check in [false, true] {
        let mut args = vec![
            "--uid",
            "61520",
            "--victim-uid",
            "61520",
            "--varlink",
            &sock,
            "--pidns-from-host",
        ];
        if check {
            args.push("--check");
        }
        let reply = ns_caller_reply(&args);
        assert_eq!(reply["error"], "org.varlink.service.InvalidParameter", "{reply}");
        assert_eq!(reply["parameters"]["parameter"], "pidns", "{reply}");
    }
}

/// Attack: a process names itself with Unicode format characters, which
/// print as nothing but reorder or hide what follows: `\u{202e}dhss` (a
/// right-to-left override, 7 bytes) shows as "sshd" in the reply, in
/// `reapctl`'s "pid N (COMM, uid U)" line and in the audit record, while
/// the broker's escaping (control characters and backslashes only) lets it
/// through. An operator reading either sees a name the process does not
/// have.
#[test]
fn a_command_name_cannot_hide_or_reorder_text_where_it_is_shown() {
    const U: u32 = 61530;
    let broker = Broker::start();
    let names: [&'static [u8]; 3] = [
        "\u{202e}dhss".as_bytes(),        // right-to-left override
        "ss\u{200b}hd".as_bytes(),        // zero-width space
        "a\u{2066}b\u{2069}c".as_bytes(), // isolates
    ];
    for name in names {
        let victim = Victim::spawn_named(Creds::uid(U), 0, Some(name));
        let r = broker.reapctl(Creds::ROOT, &["check", &victim.pid.to_string()]);
        assert_eq!(r.code, 0, "{r:?}");
        let comm = r.json["target"]["comm"].as_str().unwrap_or_default().to_string();
        assert!(
            !comm.chars().any(is_invisible_format),
            "the reply shows an invisible format character: {comm:?}"
        );
        let needle = format!("target_pid={} ", victim.pid);
        assert!(wait_for_log(&broker.log, &needle, Duration::from_secs(10)));
        let log = broker.log_text();
        let record = log.lines().find(|l| l.contains(&needle)).unwrap();
        assert!(
            !record.chars().any(is_invisible_format),
            "the audit record carries an invisible format character: {record:?}"
        );
    }
}

/// Bidirectional controls, zero-width characters and other invisible
/// formatting (Unicode category Cf) and line/paragraph separators.
fn is_invisible_format(ch: char) -> bool {
    matches!(ch,
        '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// Attack (on the report, not the decision): a process whose main thread
/// left with `pthread_exit` while another thread lives on. Every per-process
/// read by pid then reads the zombie leader: `/proc/PID/status` has no
/// memory lines, so the kill of a process holding 16 MiB is reported and
/// audited as `memory_before` 0 and `bytes_released` 0. (The same holds for
/// `/proc/PID/cgroup`: the leader's stays where it died when root moves the
/// live threads; see threats.md.)
#[test]
fn a_process_whose_leader_exited_is_reported_with_the_memory_it_holds() {
    use std::os::unix::process::CommandExt;
    const U: u32 = 61540;
    const BYTES: u64 = 16 << 20;
    let broker = Broker::start();
    let script = format!(
        "import ctypes, threading\n\
         held = bytearray(b'\\x01') * {BYTES}\n\
         threading.Thread(target=lambda: threading.Event().wait()).start()\n\
         print('r', flush=True)\n\
         ctypes.CDLL(None).pthread_exit(None)\n"
    );
    let Ok(mut child) = Command::new("python3")
        .arg("-c")
        .arg(script)
        .uid(U)
        .gid(U)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        reapd_e2e::skip("leader-exited", "python3 needed for a process whose leader exits");
        return;
    };
    let pid = child.id() as i32;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "r");
    // The leader is a zombie once its exit is through; the process lives.
    let state = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next()))
            .flatten()
    };
    while state() != Some('Z') {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count() >= 1);

    let r = broker.reapctl(Creds::uid(U), &["kill", &pid.to_string(), "--wait", "5000"]);
    assert_eq!(r.code, 0, "{r:?}");
    let _ = child.wait();
    let before = r.json["memory_before"]["anon_bytes"].as_u64().unwrap_or_default();
    assert!(
        before >= BYTES,
        "the process held {BYTES} bytes; the report says {before}: {r:?}"
    );
}

/// Runs `command` as uid 0 with CAP_KILL dropped from the bounding set (so
/// the exec leaves it out of every set), as a hardened service
/// (`CapabilityBoundingSet=~CAP_KILL`) or a container with `--cap-drop=KILL`
/// runs its root.
fn as_root_without_cap_kill(command: &mut Command) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    const CAP_KILL: libc::c_ulong = 5;
    // SAFETY: runs in the forked child before exec; one prctl.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_KILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run command")
}

/// Attack: a process of uid 0 that does not hold CAP_KILL (a hardened
/// root service, a container root with the capability dropped) may
/// kill(2) only uid 0's processes. The broker's kill(2) rule reads "euid 0"
/// as "root", and root as CAP_KILL: it allowed such a caller to kill any
/// user's process.
#[test]
fn uid_0_without_cap_kill_gets_no_more_than_kill_2_gives_it() {
    const V: u32 = 61550;
    let broker = Broker::start();
    let victim = Victim::spawn(Creds::uid(V), 0);
    let pid = victim.pid.to_string();
    let oracle = as_root_without_cap_kill(Command::new("/bin/sh").args(["-c", &format!("kill -0 {pid}")]));
    if oracle.status.success() {
        reapd_e2e::skip(
            "no-cap-kill",
            "dropping CAP_KILL from the bounding set had no effect here",
        );
        return;
    }
    let ctl = || {
        let mut c = Command::new(bin("reapctl"));
        c.arg("--socket").arg(&broker.grpc).arg("--json");
        c
    };
    let check = as_root_without_cap_kill(ctl().args(["check", &pid]));
    let reply: Value = serde_json::from_slice(&check.stdout).unwrap_or(Value::Null);
    assert_eq!(
        reply["allowed"], false,
        "kill(2) refuses this caller, so must the broker: {reply}"
    );
    let kill = as_root_without_cap_kill(ctl().args(["kill", &pid]));
    assert!(!kill.status.success(), "{}", String::from_utf8_lossy(&kill.stdout));
    assert!(victim.running(), "the victim must live");
}

/// A FUSE file system with one file, `f`, served by a thread of the test
/// that answers what opening and closing need and never answers an
/// `FUSE_IOCTL`: a file whose ioctls block until the server says so. It is
/// mounted `allow_other` for `uid`, as `fusermount3 -o allow_other` mounts
/// it for a user where `/etc/fuse.conf` has `user_allow_other`.
struct FuseFile {
    dir: tempfile::TempDir,
    fd: i32,
    ioctls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Unanswered ioctl requests (their `unique`), for [`FuseFile::release`].
    pending: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl FuseFile {
    fn mount(uid: u32) -> Option<FuseFile> {
        use std::sync::atomic::Ordering;
        let dir = tempfile::Builder::new().prefix("reapd-fuse").tempdir().ok()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).ok()?;
        let dev = CString::new("/dev/fuse").unwrap();
        // SAFETY: open returns a new fd or -1.
        let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!(
            "fd={fd},rootmode=40000,user_id={uid},group_id={uid},allow_other"
        ))
        .unwrap();
        let source = CString::new("reapd-test").unwrap();
        let fstype = CString::new("fuse.reapd-test").unwrap();
        // SAFETY: all pointers are live C strings.
        let ret = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        if ret != 0 {
            unsafe { libc::close(fd) };
            return None;
        }
        let ioctls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = std::sync::Arc::clone(&ioctls);
        let pending = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = std::sync::Arc::clone(&pending);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let attr = |ino: u64, mode: u32| -> Vec<u8> {
                let mut a = Vec::with_capacity(88);
                for v in [ino, 0, 0, 0, 0, 0] {
                    a.extend_from_slice(&v.to_le_bytes());
                }
                for v in [0u32, 0, 0, mode, 1, uid, uid, 0, 4096, 0] {
                    a.extend_from_slice(&v.to_le_bytes());
                }
                a
            };
            let reply = |unique: u64, error: i32, body: &[u8]| {
                let mut out = Vec::with_capacity(16 + body.len());
                out.extend_from_slice(&(16 + body.len() as u32).to_le_bytes());
                out.extend_from_slice(&error.to_le_bytes());
                out.extend_from_slice(&unique.to_le_bytes());
                out.extend_from_slice(body);
                // SAFETY: writing a live buffer to our own fd.
                unsafe { libc::write(fd, out.as_ptr().cast(), out.len()) };
            };
            loop {
                // SAFETY: reading into a live buffer.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 40 {
                    if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return; // unmounted or aborted
                }
                let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
                let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
                let (opcode, unique, nodeid) = (u32_at(4), u64_at(8), u64_at(16));
                match opcode {
                    26 => {
                        // INIT: protocol 7.31, nothing optional.
                        let mut body = Vec::new();
                        for v in [7u32, 31, 0, 0] {
                            body.extend_from_slice(&v.to_le_bytes());
                        }
                        body.extend_from_slice(&16u16.to_le_bytes());
                        body.extend_from_slice(&12u16.to_le_bytes());
                        body.extend_from_slice(&65536u32.to_le_bytes());
                        body.extend_from_slice(&1u32.to_le_bytes());
                        body.resize(64, 0);
                        reply(unique, 0, &body);
                    }
                    1 => {
                        // LOOKUP: every name is the file, inode 2.
                        let mut body = Vec::new();
                        for v in [2u64, 0, 60, 60] {
                            body.extend_from_slice(&v.to_le_bytes());
                        }
                        body.extend_from_slice(&[0u8; 8]);
                        body.extend_from_slice(&attr(2, 0o100666));
                        reply(unique, 0, &body);
                    }
                    3 => {
                        // GETATTR
                        let mut body = Vec::new();
                        body.extend_from_slice(&60u64.to_le_bytes());
                        body.extend_from_slice(&[0u8; 8]);
                        let mode = if nodeid == 1 { 0o40755 } else { 0o100666 };
                        body.extend_from_slice(&attr(nodeid, mode));
                        reply(unique, 0, &body);
                    }
                    14 | 27 => reply(unique, 0, &[0u8; 16]), // OPEN, OPENDIR
                    39 => {
                        // IOCTL: not answered (until release()).
                        held.lock().unwrap().push(unique);
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    25 | 18 | 29 => reply(unique, 0, &[]), // FLUSH, RELEASE, RELEASEDIR
                    2 | 42 => {}                           // FORGET, BATCH_FORGET: no reply
                    _ => reply(unique, -libc::ENOSYS, &[]),
                }
            }
        });
        Some(FuseFile {
            dir,
            fd,
            ioctls,
            pending,
        })
    }

    /// Answers every pending ioctl with ENOTTY: a thread waiting in one
    /// cannot even be killed before that (`request_wait_answer` waits out
    /// a request the server has read).
    fn release(&self) {
        for unique in self.pending.lock().unwrap().drain(..) {
            let mut out = Vec::with_capacity(16);
            out.extend_from_slice(&16u32.to_le_bytes());
            out.extend_from_slice(&(-libc::ENOTTY).to_le_bytes());
            out.extend_from_slice(&unique.to_le_bytes());
            // SAFETY: writing a live buffer to the server's fd.
            unsafe { libc::write(self.fd, out.as_ptr().cast(), out.len()) };
        }
    }

    fn file(&self) -> String {
        self.dir.path().join("f").to_string_lossy().into_owned()
    }

    fn ioctls(&self) -> usize {
        self.ioctls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        self.release();
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: a live C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Attack: a caller in a child pid namespace passes, as `pidns`, an open
/// file of a FUSE file system it serves itself. The broker asks the fd for
/// its parent namespace (`ioctl(NS_GET_PARENT)`) before knowing what it is,
/// and on the async executor: FUSE forwards the ioctl to the caller's
/// server, which never answers: the executor thread sits in
/// `request_wait_answer`, where not even SIGKILL ends it once the server
/// has read the request (the broker becomes unkillable), and the calls
/// queued on that thread wait with it; one more such call for the other
/// executor thread and no caller, root included, gets an answer until the
/// attacker lets go.
#[test]
fn a_fuse_file_passed_as_pidns_cannot_stall_the_broker() {
    use std::io::Read;
    const U: u32 = 61570;
    const ATTACKERS: usize = 2;
    // Declared before the broker, so the broker goes first on drop.
    let Some(fuse) = FuseFile::mount(U) else {
        reapd_e2e::skip("fuse", "cannot mount a FUSE file system here (/dev/fuse, mount)");
        return;
    };
    let broker = Broker::start();
    let sock = varlink_socket(&broker).to_string_lossy().into_owned();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut attackers = Vec::new();
    for _ in 0..ATTACKERS {
        let mut child = Command::new(bin("ns-caller"))
            .args(["--uid", &U.to_string(), "--victim-uid", &U.to_string()])
            .args(["--varlink", &sock, "--check", "--pidns-file", &fuse.file()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ns-caller");
        let mut out = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        attackers.push(child);
    }
    // Each attacker's call is either answered or stuck in the file system.
    let mut replies = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replies.len() + fuse.ioctls() < ATTACKERS && std::time::Instant::now() < deadline {
        if let Ok(text) = rx.recv_timeout(Duration::from_millis(20)) {
            replies.push(text);
        }
    }
    // Another caller, meanwhile.
    let probe_sock = varlink_socket(&broker);
    let (ptx, prx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let reply = reapd_e2e::varlink_call_as(
            Creds::uid(61571),
            &probe_sock,
            r#"{"method":"io.reapd.Reaper.GetCapabilities"}"#,
            &[],
        );
        let _ = ptx.send(reply);
    });
    let answered = prx.recv_timeout(Duration::from_secs(10));
    let stuck = fuse.ioctls();
    // Let go before anything can fail: a broker waiting in an ioctl could
    // not be stopped.
    fuse.release();
    drop(broker);
    for mut a in attackers {
        let _ = a.wait();
    }
    let answered = answered
        .unwrap_or_else(|_| panic!("the broker answered nobody while {stuck} FUSE ioctls from it were pending"));
    assert!(answered["parameters"]["brokerVersion"].is_string(), "{answered}");
    assert_eq!(stuck, 0, "the broker sent ioctls to an fd it had not identified");
    while let Ok(text) = rx.recv_timeout(Duration::from_secs(5)) {
        replies.push(text);
    }
    for text in &replies {
        assert!(text.contains(r#""parameter":"pidns""#), "{text}");
    }
}
