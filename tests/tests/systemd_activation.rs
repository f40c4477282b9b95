// SPDX-License-Identifier: MIT OR Apache-2.0
//! Socket activation without systemd as PID 1.
//!
//! 1. `systemd-socket-activate -l PATH --fdname=grpc` starts the broker on
//!    the first connection; the call succeeds; the broker exits when idle.
//! 2. The same with the socket kept open across broker runs, as systemd
//!    does: after the idle exit, a client that connects while no broker runs
//!    waits in the backlog, a new broker is started, and the call succeeds.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reapd_e2e::{bin, Creds, Value, Victim};

fn socket_activate_tool() -> String {
    for path in [
        "/usr/bin/systemd-socket-activate",
        "/lib/systemd/systemd-socket-activate",
    ] {
        if Path::new(path).exists() {
            return path.into();
        }
    }
    panic!("systemd-socket-activate not found (apt-get install systemd)");
}

fn reapctl(socket: &Path, creds: Creds, args: &[&str]) -> (i32, Value, String) {
    let mut command = Command::new(bin("reapctl"));
    command.arg("--socket").arg(socket).arg("--json").args(args);
    let out = reapd_e2e::run_as(creds, &mut command);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Kills and reaps the child when the test ends, pass or panic.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn systemd_socket_activate_starts_the_broker_which_exits_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("grpc.sock");
    let log = dir.path().join("reapd.log");
    let activator = Command::new(socket_activate_tool())
        .arg("-l")
        .arg(&socket)
        .arg("--fdname=grpc")
        .arg("-E")
        .arg("REAPD_LOG=info")
        .arg(bin("reapd"))
        // Never used: the passed socket wins. A path in the tempdir keeps a
        // mistake from touching /run/reapd.
        .arg("--grpc-socket")
        .arg(dir.path().join("unused.sock"))
        // Hermetic: never the host's /etc/reapd/policy.toml.
        .arg("--policy")
        .arg(empty_policy(dir.path()))
        .arg("--idle-exit-secs=1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut activator = KillOnDrop(activator);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The tool creates the socket under root's umask; open it to the
    // unprivileged caller as reapd.socket's SocketMode=0666 does.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    // Nothing started yet: the activator only listens.
    assert!(!log_of(&log).contains("serving gRPC"), "{}", log_of(&log));

    let mut victim = Victim::spawn(Creds::uid(61031), 16 << 20);
    let (code, json, stderr) = reapctl(
        &socket,
        Creds::uid(61031),
        &["kill", &victim.pid.to_string(), "--wait", "2000"],
    );
    assert_eq!(code, 0, "{stderr}\n{}", log_of(&log));
    assert_eq!(json["exited"], true, "{json}");
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
    let text = log_of(&log);
    assert!(text.contains("gRPC socket passed by the service manager"), "{text}");
    assert!(!dir.path().join("unused.sock").exists());

    // Idle for 1 s with no connection: a clean exit.
    let status = wait_exit(&mut activator.0, Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", log_of(&log));
    assert!(log_of(&log).contains("idle with no connections"), "{}", log_of(&log));
}

/// An empty policy file in `dir` (the built-in default), so no test broker
/// reads the host's /etc.
fn empty_policy(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, "").unwrap();
    path
}

/// Starts `reapd` as systemd would: `listener` as fd 3, LISTEN_FDS=1,
/// LISTEN_FDNAMES=grpc, LISTEN_PID = the broker's own pid (sh sets it to
/// its `$$` and execs, which keeps the pid).
fn activate(listener: &UnixListener, dir: &Path, log: &Path) -> Child {
    let fd = listener.as_raw_fd();
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(bin("reapd"))
        .arg("--grpc-socket")
        .arg(dir.join("unused.sock"))
        .arg("--policy")
        .arg(empty_policy(dir))
        .arg("--idle-exit-secs=1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "grpc")
        .env("REAPD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap());
    // SAFETY: dup2 and fcntl are async-signal-safe; the child only moves the
    // listening socket to fd 3 (without CLOEXEC) before exec.
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
    command.spawn().unwrap()
}

/// Waits until a client is queued on `listener` (it is readable).
fn wait_readable(listener: &UnixListener, timeout: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
    n == 1 && fds[0].revents & libc::POLLIN != 0
}

#[test]
fn after_an_idle_exit_the_next_call_starts_the_broker_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = dir.path().join("grpc.sock");
    let log = dir.path().join("reapd.log");
    // The test plays systemd: it owns the listening socket for good.
    let listener = UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();

    for round in 1..=2 {
        // The client connects first, while no broker runs.
        let sock = socket.clone();
        let client = std::thread::spawn(move || reapctl(&sock, Creds::uid(61032), &["caps"]));
        assert!(
            wait_readable(&listener, Duration::from_secs(10)),
            "round {round}: no client queued"
        );
        let mut broker = KillOnDrop(activate(&listener, dir.path(), &log));
        let (code, json, stderr) = client.join().unwrap();
        assert_eq!(code, 0, "round {round}: {stderr}\n{}", log_of(&log));
        assert!(json["process_mrelease"].is_boolean(), "{json}");
        let status = wait_exit(&mut broker.0, Duration::from_secs(15));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "round {round}:\n{}",
            log_of(&log)
        );
    }
    let mut text = String::new();
    std::fs::File::open(&log).unwrap().read_to_string(&mut text).unwrap();
    assert_eq!(text.matches("idle with no connections").count(), 2, "{text}");
}
