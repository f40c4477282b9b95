// SPDX-License-Identifier: MIT OR Apache-2.0
//! Support for reapd's end-to-end tests: a broker on a private socket,
//! victims with chosen credentials that hold real memory, clients run under
//! other uids, and the kernel's own kill(2) as an oracle.
//!
//! Everything here needs root (CI runs as root). Children forked from the
//! multi-threaded test process do only async-signal-safe work (raw syscalls,
//! touching memory, pause) before they exit or exec.

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub mod fuse;

/// Directory holding the workspace's built binaries (`cargo build` first).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REAPD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // tests/ is one level below the workspace root; test binaries live in
    // target/<profile>/deps, the workspace binaries in target/<profile>.
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A broker on a private socket, stopped on drop.
pub struct Broker {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub grpc: PathBuf,
    pub log: PathBuf,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[], &[])
    }

    /// Starts `reapd` with extra `args`, run through `wrapper` (a command
    /// and its args, e.g. the seccomp-errno helper) when it is not empty.
    pub fn start_with(args: &[&str], wrapper: &[&str]) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("reapd-test")
            .tempdir()
            .expect("tempdir");
        // Callers under other uids must reach the socket.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let grpc = dir.path().join("grpc.sock");
        let log = dir.path().join("reapd.log");
        let reapd = bin("reapd");
        let mut command = if wrapper.is_empty() {
            Command::new(&reapd)
        } else {
            let mut c = Command::new(wrapper[0]);
            c.args(&wrapper[1..]).arg(&reapd);
            c
        };
        // Hermetic: a broker never reads the host's /etc/reapd/policy.toml.
        // Without an explicit --policy it gets an empty file, which is the
        // built-in default.
        let mut policy_args: Vec<std::ffi::OsString> = Vec::new();
        if !args.contains(&"--policy") {
            let empty = dir.path().join("policy.toml");
            std::fs::write(&empty, "").unwrap();
            policy_args.push("--policy".into());
            policy_args.push(empty.into_os_string());
        }
        command
            .arg("--grpc-socket")
            .arg(&grpc)
            .args(&policy_args)
            .args(args)
            .env("REAPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().expect("spawn reapd");
        let broker = Broker { child, dir, grpc, log };
        broker.wait_ready();
        broker
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.grpc).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not come up; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Runs `reapctl --json ARGS` against this broker as `creds`.
    pub fn reapctl(&self, creds: Creds, args: &[&str]) -> CtlResult {
        let mut command = Command::new(bin("reapctl"));
        command.arg("--socket").arg(&self.grpc).arg("--json").args(args);
        let output = run_as(creds, &mut command);
        CtlResult::from(output)
    }

    /// The broker is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        unsafe_kill(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The result of one `reapctl --json` run.
#[derive(Debug)]
pub struct CtlResult {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
}

impl From<Output> for CtlResult {
    fn from(output: Output) -> Self {
        let stdout = String::from_utf8_lossy(&output.stdout);
        CtlResult {
            code: output.status.code().unwrap_or(-1),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Credentials for a process: real, effective, saved uid; gid; groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub ruid: u32,
    pub euid: u32,
    pub suid: u32,
    pub gid: u32,
    pub groups: &'static [u32],
}

impl Creds {
    pub const ROOT: Creds = Creds {
        ruid: 0,
        euid: 0,
        suid: 0,
        gid: 0,
        groups: &[],
    };

    pub const fn uid(uid: u32) -> Creds {
        Creds {
            ruid: uid,
            euid: uid,
            suid: uid,
            gid: uid,
            groups: &[],
        }
    }

    pub const fn uids(ruid: u32, euid: u32, suid: u32) -> Creds {
        Creds {
            ruid,
            euid,
            suid,
            gid: euid,
            groups: &[],
        }
    }
}

/// Drops to `creds` in the current (single-threaded, freshly forked)
/// process, with raw syscalls only.
///
/// # Safety
/// Call only in a forked child before exec or _exit.
unsafe fn become_creds(creds: Creds) -> bool {
    let groups: &[u32] = creds.groups;
    libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0
        && libc::syscall(libc::SYS_setresgid, creds.gid, creds.gid, creds.gid) == 0
        && libc::syscall(libc::SYS_setresuid, creds.ruid, creds.euid, creds.suid) == 0
}

/// Makes `command` take `creds` in its child, before exec.
fn with_creds(creds: Creds, command: &mut Command) -> &mut Command {
    if creds != Creds::ROOT {
        // SAFETY: pre_exec runs in the forked child before exec; become_creds
        // makes only raw syscalls.
        unsafe {
            command.pre_exec(move || {
                if become_creds(creds) {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    command.stdin(Stdio::null())
}

/// Runs `command` (waiting for it) with `creds`.
pub fn run_as(creds: Creds, command: &mut Command) -> Output {
    with_creds(creds, command).output().expect("run command")
}

/// Starts `command` (without waiting) with `creds`, first moved (still as
/// root) into each cgroup directory of `cgroups` (a cgroup2 cgroup and,
/// on a hybrid host, a cgroup v1 one).
pub fn spawn_as(creds: Creds, cgroups: &[PathBuf], command: &mut Command) -> Child {
    let procs: Vec<CString> = cgroups
        .iter()
        .map(|d| CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap())
        .collect();
    // SAFETY: runs in the forked child before exec; only open/write/close
    // and become_creds's raw syscalls.
    unsafe {
        command.pre_exec(move || {
            for path in &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if creds == Creds::ROOT || become_creds(creds) {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command.stdin(Stdio::null()).spawn().expect("spawn")
}

/// A process with chosen credentials, optionally holding memory, killed
/// and waited for on drop.
pub struct Victim {
    pub pid: i32,
    waited: bool,
}

impl Victim {
    /// Forks a child that takes `creds`, touches `bytes` of private
    /// anonymous memory, then sleeps until killed.
    pub fn spawn(creds: Creds, bytes: usize) -> Victim {
        Victim::spawn_named(creds, bytes, None)
    }

    /// As [`Victim::spawn`], and the child names itself `name` with
    /// `prctl(PR_SET_NAME)` (any bytes; the kernel keeps 15).
    pub fn spawn_named(creds: Creds, bytes: usize, name: Option<&'static [u8]>) -> Victim {
        Victim::spawn_inner(creds, bytes, name, None)
    }

    /// As [`Victim::spawn`], and the child, once it has taken `creds`,
    /// connects to the Unix socket at `socket`: the peer a listener there
    /// accepts is this process, with these credentials (SO_PEERCRED).
    pub fn spawn_connected(creds: Creds, socket: &Path) -> Victim {
        Victim::spawn_inner(creds, 0, None, Some(socket))
    }

    fn spawn_inner(creds: Creds, bytes: usize, name: Option<&'static [u8]>, socket: Option<&Path>) -> Victim {
        // Built before the fork: the child only copies bytes.
        let address = socket.map(|path| {
            let raw = path.as_os_str().as_encoded_bytes();
            // SAFETY: sockaddr_un is plain old data; all zeroes is valid.
            let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            assert!(raw.len() < addr.sun_path.len(), "socket path too long");
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in raw.iter().enumerate() {
                addr.sun_path[i] = *b as libc::c_char;
            }
            (addr, std::mem::size_of::<libc::sa_family_t>() + raw.len() + 1)
        });
        let name: Option<[u8; 16]> = name.map(|n| {
            let mut buf = [0u8; 16];
            buf[..n.len().min(15)].copy_from_slice(&n[..n.len().min(15)]);
            buf
        });
        let (ready_r, ready_w) = pipe();
        // SAFETY: fork in a test process; the child only makes raw syscalls,
        // touches memory it mapped, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                libc::close(ready_r);
                // Keep nothing of the test process but stdio and the ready
                // pipe: a victim must not hold a test's sockets open.
                let keep = ready_w as libc::c_uint;
                libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, keep - 1, 0 as libc::c_uint);
                libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0 as libc::c_uint);
                if !become_creds(creds) {
                    libc::_exit(90);
                }
                if let Some(name) = &name {
                    libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                }
                if let Some((addr, len)) = &address {
                    let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    if sock < 0
                        || libc::connect(sock, (addr as *const libc::sockaddr_un).cast(), *len as libc::socklen_t) != 0
                    {
                        libc::_exit(92);
                    }
                }
                if bytes > 0 {
                    let mem = libc::mmap(
                        std::ptr::null_mut(),
                        bytes,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if mem == libc::MAP_FAILED {
                        libc::_exit(91);
                    }
                    let mut offset = 0;
                    while offset < bytes {
                        *(mem as *mut u8).add(offset) = 1;
                        offset += 4096;
                    }
                }
                libc::write(ready_w, b"r".as_ptr() as *const libc::c_void, 1);
                loop {
                    libc::pause();
                }
            }
        }
        unsafe { libc::close(ready_w) };
        let mut byte = [0u8; 1];
        let n = unsafe { libc::read(ready_r, byte.as_mut_ptr() as *mut libc::c_void, 1) };
        unsafe { libc::close(ready_r) };
        assert_eq!(n, 1, "victim {pid} did not get ready");
        Victim { pid, waited: false }
    }

    /// Start time (field 22 of /proc/PID/stat).
    pub fn start_time(&self) -> u64 {
        start_time_of(self.pid).expect("victim stat")
    }

    /// The victim has not exited (it is not a zombie).
    pub fn running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with(|c| c != 'Z' && c != 'X')))
            .unwrap_or(false)
    }

    /// Waits for the victim; returns the signal that killed it, if any.
    pub fn wait(&mut self) -> Option<i32> {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let ret = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        self.waited = true;
        (ret == self.pid && libc::WIFSIGNALED(status)).then(|| libc::WTERMSIG(status))
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if !self.waited {
            unsafe_kill(self.pid, libc::SIGKILL);
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

pub fn unsafe_kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory arguments.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// The kernel's answer: may a process with `creds` signal `pid`?
/// Asked by a forked child that takes the credentials and calls kill(pid, 0).
pub fn kernel_allows_kill(creds: Creds, pid: i32) -> bool {
    // SAFETY: the child makes only raw syscalls and _exits.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        unsafe {
            if !become_creds(creds) {
                libc::_exit(2);
            }
            let ok = libc::syscall(libc::SYS_kill, pid, 0) == 0;
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    unsafe { libc::waitpid(child, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    match libc::WEXITSTATUS(status) {
        0 => true,
        1 => false,
        other => panic!("oracle child failed to take {creds:?}: {other}"),
    }
}

/// The kernel's answers for many targets at once: may a process with
/// `creds` signal each of `pids`? One forked child takes the credentials
/// and calls kill(pid, 0) for each, in order.
pub fn kernel_allows_kill_each(creds: Creds, pids: &[i32]) -> Vec<bool> {
    let (answers_r, answers_w) = pipe();
    let pids = pids.to_vec();
    let mut answers = vec![0u8; pids.len()];
    // SAFETY: the child makes only raw syscalls on memory allocated before
    // the fork, then _exits.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        unsafe {
            libc::close(answers_r);
            if !become_creds(creds) {
                libc::_exit(2);
            }
            for (i, pid) in pids.iter().enumerate() {
                answers[i] = if libc::syscall(libc::SYS_kill, *pid, 0) == 0 {
                    b'y'
                } else if *libc::__errno_location() == libc::EPERM {
                    b'n'
                } else {
                    b'?'
                };
            }
            let mut written = 0;
            while written < answers.len() {
                let n = libc::write(answers_w, answers[written..].as_ptr().cast(), answers.len() - written);
                if n <= 0 {
                    libc::_exit(3);
                }
                written += n as usize;
            }
            libc::_exit(0);
        }
    }
    unsafe { libc::close(answers_w) };
    let (got, status) = collect_child(answers_r, child);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "oracle child for {creds:?} failed: {status:#x}"
    );
    assert_eq!(got.len(), answers.len());
    got.iter()
        .map(|a| match a {
            b'y' => true,
            b'n' => false,
            _ => panic!("kill(pid, 0) failed other than with EPERM: a target is gone"),
        })
        .collect()
}

pub fn start_time_of(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Reads the broker's log until `needle` appears or `timeout` passes.
pub fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(file) = std::fs::File::open(path) {
            if BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains(needle))
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Number of open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A cgroup under the cgroup2 mount, removed (with any children) on drop.
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(relative: &str) -> TestCgroup {
        let mount = reapd::os::procfs::cgroup2_mount().expect("no cgroup2 mount");
        let dir = mount.join(relative);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir }
    }

    pub fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    }
}

/// Removes a test's whole cgroup tree on drop; create it before the
/// victims so it is dropped after them.
pub struct CgroupTree {
    pub dir: PathBuf,
}

impl CgroupTree {
    pub fn new(name: &str) -> CgroupTree {
        let mount = reapd::os::procfs::cgroup2_mount().expect("no cgroup2 mount");
        CgroupTree { dir: mount.join(name) }
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        // Deepest first; an exited process may take a moment to leave.
        for _ in 0..100 {
            let mut dirs: Vec<PathBuf> = walk(&self.dir);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in &dirs {
                let _ = std::fs::remove_dir(d);
            }
            if !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

fn walk(dir: &PathBuf) -> Vec<PathBuf> {
    let mut out = vec![dir.clone()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

/// A unique top cgroup for one test.
pub fn top(name: &str) -> String {
    format!("reapd-test-{}-{name}", std::process::id())
}

/// Writes `text` to a policy file in `broker_dir`-independent temp storage.
pub fn policy_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// A broker with this explicit policy file.
pub fn start_with_policy(policy: &tempfile::NamedTempFile) -> Broker {
    Broker::start_with(&["--policy", policy.path().to_str().unwrap()], &[])
}

/// `reapctl --json ARGS` as `creds`, with the process first moved into
/// `cgroup` (while still root, before the credentials change).
pub fn reapctl_in(broker: &Broker, cgroup: Option<&TestCgroup>, creds: Creds, args: &[&str]) -> CtlResult {
    let mut command = Command::new(bin("reapctl"));
    command.arg("--socket").arg(&broker.grpc).arg("--json").args(args);
    if let Some(cg) = cgroup {
        let procs = CString::new(cg.dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: runs in the forked child before exec; only open/write/close.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    CtlResult::from(run_as(creds, &mut command))
}

/// The broker's varlink socket (beside its gRPC socket, the default).
pub fn varlink_socket(broker: &Broker) -> PathBuf {
    broker.dir.path().join("io.reapd.Reaper")
}

/// A `reapctl` command aimed at `broker` over varlink or gRPC (its
/// subcommand and options still to add).
pub fn reapctl_over(broker: &Broker, varlink: bool) -> Command {
    let mut command = Command::new(bin("reapctl"));
    if varlink {
        command.arg("--varlink").arg("--socket").arg(varlink_socket(broker));
    } else {
        command.arg("--socket").arg(&broker.grpc);
    }
    command
}

/// Waits (up to 10 s) for the varlink socket too: [`Broker::start`] probes
/// readiness on gRPC only.
pub fn wait_for_varlink(broker: &Broker) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(varlink_socket(broker)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no varlink socket; log:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One raw varlink call with `fds` attached (SCM_RIGHTS), as `creds` would
/// make it: the call is made from a forked child that takes the
/// credentials, so the broker sees that caller. Returns the reply.
pub fn varlink_call_as(creds: Creds, socket: &Path, message: &str, fds: &[std::os::fd::RawFd]) -> Value {
    let (reply_r, reply_w) = pipe();
    let path = CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    let mut bytes = message.as_bytes().to_vec();
    bytes.push(0);
    let fds = fds.to_vec();
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut control = vec![0u8; space.max(8)];
    // SAFETY: the child makes only raw syscalls on buffers prepared before
    // the fork, then _exits.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        unsafe {
            libc::close(reply_r);
            if !become_creds(creds) {
                libc::_exit(90);
            }
            let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let raw = path.as_bytes();
            for (i, b) in raw.iter().enumerate().take(addr.sun_path.len() - 1) {
                addr.sun_path[i] = *b as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sa_family_t>() + raw.len() + 1;
            if libc::connect(
                sock,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len as u32,
            ) != 0
            {
                libc::_exit(91);
            }
            let mut iov = libc::iovec {
                iov_base: bytes.as_mut_ptr().cast(),
                iov_len: bytes.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !fds.is_empty() {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<i32>(), fds.len());
            }
            if libc::sendmsg(sock, &msg, 0) < 0 {
                libc::_exit(92);
            }
            let mut byte = 0u8;
            while libc::read(sock, (&mut byte as *mut u8).cast(), 1) == 1 && byte != 0 {
                libc::write(reply_w, (&byte as *const u8).cast(), 1);
            }
            libc::_exit(0);
        }
    }
    unsafe { libc::close(reply_w) };
    let (reply, _) = collect_child(reply_r, child);
    serde_json::from_slice(&reply).unwrap_or(Value::Null)
}

/// Reads what forked `child` writes to the pipe `read_end` until it closes
/// (closing our end then), and waits for the child: its bytes and its wait
/// status.
fn collect_child(read_end: i32, child: i32) -> (Vec<u8>, i32) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a live local buffer.
        let n = unsafe { libc::read(read_end, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n as usize]);
    }
    // SAFETY: our pipe end and our own child.
    unsafe { libc::close(read_end) };
    let mut status = 0;
    unsafe { libc::waitpid(child, &mut status, 0) };
    (bytes, status)
}

/// Records a skipped precondition: printed, and appended to the file named
/// by `REAPD_SKIP_LOG` (scripts/test.sh sets it, counts the lines and shows
/// them in its summary), so a skip is never a silent pass.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIP: {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("REAPD_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// Runs `reapctl --json ARGS` as `creds` (its `args` include the socket
/// and transport), giving up after `timeout`: `None` if it had not exited by
/// then (it is killed). For waits on a broker that may never answer (one
/// that serves a connection at a time), which must fail, not hang.
pub fn reapctl_within(creds: Creds, args: &[&std::ffi::OsStr], timeout: Duration) -> Option<CtlResult> {
    let mut command = Command::new(bin("reapctl"));
    command
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = with_creds(creds, &mut command).spawn().expect("spawn reapctl");
    // Read the pipes while it runs: a reply larger than a pipe's buffer
    // must not hold the child up.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for reapctl") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    status.map(|status| CtlResult::from(Output { status, stdout, stderr }))
}

/// The broker's metrics (`reapctl --varlink stats`, `io.systemd.Metrics`)
/// as `creds` reads them (root, or a uid a `watch` rule names), or `None`
/// if the broker did not answer within `timeout`.
pub fn metrics_within(broker: &Broker, creds: Creds, timeout: Duration) -> Option<Vec<Value>> {
    let socket = varlink_socket(broker);
    let args: [&std::ffi::OsStr; 4] = [
        "--varlink".as_ref(),
        "--socket".as_ref(),
        socket.as_os_str(),
        "stats".as_ref(),
    ];
    let r = reapctl_within(creds, &args, timeout)?;
    assert_eq!(r.code, 0, "reapctl stats as {creds:?}: {r:?}");
    Some(serde_json::from_value(r.json.clone()).unwrap_or_else(|_| panic!("stats are not a JSON list: {r:?}")))
}

/// The value of metric `name` (without the `io.reapd.` prefix) summed over
/// its entries whose fields include all of `fields`.
pub fn metric(metrics: &[Value], name: &str, fields: &[(&str, &str)]) -> f64 {
    metrics
        .iter()
        .filter(|m| m["name"] == format!("io.reapd.{name}"))
        .filter(|m| {
            let have: Vec<(String, String)> = serde_json::from_value(m["fields"].clone()).unwrap_or_default();
            fields
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        })
        .map(|m| m["value"].as_f64().unwrap())
        .sum()
}

/// Polls the broker's metrics as `creds` until `ready` holds of them, and
/// returns them; panics after `timeout` (naming `what`), or when the broker
/// stops answering metrics calls within it.
pub fn wait_for_metrics(
    broker: &Broker,
    creds: Creds,
    what: &str,
    timeout: Duration,
    ready: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let metrics = metrics_within(broker, creds, left.max(Duration::from_millis(100))).unwrap_or_else(|| {
            panic!("waiting for {what}: the broker did not answer a metrics call within {timeout:?}")
        });
        if ready(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {what}: not within {timeout:?}; last metrics: {:?}",
            metrics
                .iter()
                .filter(|m| m["fields"].as_array().is_none_or(|f| f.is_empty()))
                .map(|m| format!("{}={}", m["name"], m["value"]))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The policy rule that lets `uid` read the broker's metrics (a `watch`
/// grant) without being root: its own connections then do not count
/// against root's per-uid connection cap while it watches root's.
pub fn watch_rule(uid: u32) -> String {
    format!("[[rule]]\nname = \"metrics-reader\"\nactions = [\"watch\"]\ncaller.uids = [{uid}]\ntarget.any = true\n")
}

/// Lines of `log` that contain every one of `needles`.
pub fn count_lines(log: &str, needles: &[&str]) -> usize {
    log.lines().filter(|l| needles.iter().all(|n| l.contains(n))).count()
}

/// How a connection the test holds ended.
#[derive(Debug)]
pub enum Closed {
    /// The broker closed it: EOF after `bytes` bytes, `after` its connect.
    Eof { bytes: usize, after: Duration },
    /// Still open when the read gave up (a read timeout is not a close).
    Open(std::io::Error),
}

/// Reads `stream` until EOF or until `deadline` (measured from `connected`).
pub fn how_closed(stream: &mut std::os::unix::net::UnixStream, connected: Instant, deadline: Duration) -> Closed {
    let mut bytes = 0;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_sub(connected.elapsed());
        if left.is_zero() {
            return Closed::Open(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match std::io::Read::read(stream, &mut buf) {
            Ok(0) => {
                return Closed::Eof {
                    bytes,
                    after: connected.elapsed(),
                }
            }
            Ok(n) => bytes += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Closed::Open(err),
        }
    }
}

/// Polls `ready` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A cgroup v1 freezer hierarchy: the one mounted, or one we mount. A
/// SIGKILLed task in it stays (unlike in the cgroup2 freezer) until thawed,
/// so it cannot win the race to exit_mm(), and a kill's wait for its exit
/// lasts as long as the test wants. Declare it after the victims it
/// freezes: it is then dropped (thawed) first, and a failing test cannot
/// leave a victim frozen forever.
pub struct Freezer {
    dir: PathBuf,
    mounted: Option<tempfile::TempDir>,
}

impl Freezer {
    pub fn new(name: &str) -> Freezer {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let existing = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let opts = r.nth(1)?;
            (fstype == "cgroup" && opts.split(',').any(|o| o == "freezer"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        });
        let (root, mounted) = match existing {
            Some(root) => (root, None),
            None => {
                let tmp = tempfile::tempdir().unwrap();
                let status = Command::new("mount")
                    .args(["-t", "cgroup", "-o", "freezer", "reapd-freezer"])
                    .arg(tmp.path())
                    .status()
                    .unwrap();
                assert!(status.success(), "cannot mount a v1 freezer");
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let dir = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        Freezer { dir, mounted }
    }

    /// Moves `pid` in and waits until the cgroup reports FROZEN.
    pub fn freeze(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        std::fs::write(self.dir.join("freezer.state"), "FROZEN").unwrap();
        for _ in 0..500 {
            if std::fs::read_to_string(self.dir.join("freezer.state")).unwrap().trim() == "FROZEN" {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("freezer did not freeze");
    }

    pub fn thaw(&self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.thaw();
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(tmp) = &self.mounted {
            let _ = Command::new("umount").arg(tmp.path()).status();
        }
    }
}

/// Kernel features as the test sees them, probed here (never assumed from
/// the kernel version), to compare with what the broker reports.
pub mod probe {
    use std::os::fd::AsRawFd;

    fn mrelease_errno(flags: u32) -> i32 {
        // SAFETY: fd -1 is never valid; the call only reports an errno.
        let ret = unsafe { libc::syscall(libc::SYS_process_mrelease, -1 as libc::c_long, flags as libc::c_long) };
        if ret == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    }

    /// `process_mrelease(2)` exists (5.15).
    pub fn process_mrelease() -> bool {
        mrelease_errno(0) != libc::ENOSYS
    }

    /// `PROCESS_MRELEASE_REAP_KILL` is known (reapd's kernel series).
    pub fn reap_kill_flag() -> bool {
        mrelease_errno(1) == libc::EBADF
    }

    /// The broker's kill path on this kernel.
    pub fn kill_path() -> &'static str {
        if !process_mrelease() {
            "kill_only"
        } else if reap_kill_flag() {
            "reap_kill"
        } else {
            "kill_then_mrelease"
        }
    }

    /// `PIDFD_GET_INFO` answers on a pidfd of ourselves (6.13).
    pub fn pidfd_get_info() -> bool {
        // SAFETY: pidfd_open returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) } as i32;
        if fd < 0 {
            return false;
        }
        let mut info = [0u64; 8];
        info[0] = 1; // PIDFD_INFO_PID
        let request: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
        // SAFETY: a 64-byte buffer, the size the request number encodes.
        let ret = unsafe { libc::ioctl(fd, request, info.as_mut_ptr()) };
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        ret == 0
    }

    /// `SO_PEERPIDFD` answers on a socket pair (6.5).
    pub fn so_peerpidfd() -> bool {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: live locals of the sizes passed.
        let ret = unsafe {
            libc::getsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                77,
                (&mut fd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if ret == 0 && fd >= 0 {
            // SAFETY: the kernel gave us this fd.
            unsafe { libc::close(fd) };
        }
        ret == 0
    }
}

/// Count of the broker log's audit lines of `event` ("decision"/"outcome") naming `pid` exactly.
pub fn audit_records(log: &str, event: &str, pid: i32) -> usize {
    let pid = format!("target_pid={pid}");
    let event = format!("event=\"{event}\"");
    log.lines()
        .filter(|l| l.contains(&event) && l.split_whitespace().any(|w| w == pid))
        .count()
}
