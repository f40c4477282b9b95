// SPDX-License-Identifier: MIT OR Apache-2.0
//! `ns-caller`: runs a reapd client inside a new pid namespace, next to a
//! victim of its own, for the identity tests. Single-threaded, run as root.
//!
//! ```text
//! ns-caller [--uid U] [--victim-uid V] [--victim-bytes B] [--last-pid N]
//!           [--host-pidfd PID | --target-pid N]
//!           (-- CMD ARGS... | --varlink SOCKET [--pidns] [--check])
//! ```
//!
//! It unshares a pid namespace; its first child (pid 1 there) optionally
//! sets `ns_last_pid` so the victim gets pid N, forks the victim (uid V,
//! touching B bytes), then runs the client as uid U: either `CMD` with every
//! `{victim}` replaced by the victim's pid *in the namespace*, or one raw
//! varlink `KillAndReap` (`CheckPermission` with `--check`) naming the
//! victim by that pid, with `--pidns` passing `/proc/self/ns/pid` as the
//! `pidns` fd, or, with `--host-pidfd PID`, naming the target by a pidfd of
//! host process PID opened before the namespace existed. Afterwards it
//! prints `ns-caller: victim=NSPID signal=SIG exit=CODE` (SIG 0: alive).
//!
//! With `--pidns-from-host`, the `pidns` fd passed is the namespace
//! `ns-caller` was started in (opened before the unshare), not the
//! client's own.
//!
//! With `--pidns-file PATH`, the `pidns` fd passed is PATH, opened by the
//! client after it took its uid (any file the caller can open).
//!
//! With `--userns BASE` it makes a user namespace instead (no pid
//! namespace) mapping uids and gids 0..10 to BASE..BASE+10; the client runs
//! as root there and the victim as uid `--victim-uid` of the namespace.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

#[derive(Default)]
struct Args {
    uid: u32,
    victim_uid: u32,
    victim_bytes: usize,
    last_pid: Option<i32>,
    host_pidfd: Option<i32>,
    target_pid: Option<i32>,
    varlink: Option<String>,
    pidns: bool,
    pidns_from_host: bool,
    pidns_file: Option<String>,
    check: bool,
    userns: Option<u32>,
    command: Vec<String>,
}

fn parse() -> Args {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().expect("missing value");
        match a.as_str() {
            "--uid" => args.uid = value().parse().unwrap(),
            "--victim-uid" => args.victim_uid = value().parse().unwrap(),
            "--victim-bytes" => args.victim_bytes = value().parse().unwrap(),
            "--last-pid" => args.last_pid = Some(value().parse().unwrap()),
            "--host-pidfd" => args.host_pidfd = Some(value().parse().unwrap()),
            "--target-pid" => args.target_pid = Some(value().parse().unwrap()),
            "--varlink" => args.varlink = Some(value()),
            "--pidns" => args.pidns = true,
            "--pidns-from-host" => args.pidns_from_host = true,
            "--pidns-file" => args.pidns_file = Some(value()),
            "--check" => args.check = true,
            "--userns" => args.userns = Some(value().parse().unwrap()),
            "--" => {
                args.command = it.by_ref().collect();
                break;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

fn check(ret: libc::c_long, what: &str) {
    if ret < 0 {
        eprintln!("ns-caller: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(99);
    }
}

fn become_uid(uid: u32) {
    // SAFETY: plain credential syscalls in a single-threaded process.
    unsafe {
        check(
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
            "setgroups",
        );
        check(libc::syscall(libc::SYS_setresgid, uid, uid, uid), "setresgid");
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid), "setresuid");
    }
}

fn wait(pid: i32, flags: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let ret = unsafe { libc::waitpid(pid, &mut status, flags) };
    (ret == pid).then_some(status)
}

/// Sends one varlink call with `fds` attached and returns the reply text.
fn varlink_call(socket: &str, message: &str, fds: &[RawFd]) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the varlink socket");
    let mut bytes = message.as_bytes().to_vec();
    bytes.push(0);
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr points at live buffers of the given sizes; the cmsg
    // macros stay within `control`.
    unsafe {
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
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        }
        check(libc::sendmsg(stream.as_raw_fd(), &msg, 0) as libc::c_long, "sendmsg");
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != 0 {
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

fn main() {
    let args = parse();
    if let Some(base) = args.userns {
        userns_main(&args, base);
    }
    let host_pidfd: Option<OwnedFd> = args.host_pidfd.map(|pid| {
        // SAFETY: pidfd_open returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        check(fd, "pidfd_open of the host process");
        // SAFETY: a new fd we own.
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    });
    let host_pidns = args
        .pidns_from_host
        .then(|| std::fs::File::open("/proc/self/ns/pid").expect("open the starting pid namespace"));
    // SAFETY: unshare has no memory arguments.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWPID) } as libc::c_long,
        "unshare(CLONE_NEWPID)",
    );
    // SAFETY: single-threaded process.
    let init = unsafe { libc::fork() };
    check(init as libc::c_long, "fork");
    if init > 0 {
        let status = wait(init, 0).unwrap_or(0);
        std::process::exit(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            98
        });
    }
    // pid 1 of the new namespace from here.
    if let Some(n) = args.last_pid {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (n - 1).to_string()).expect("write ns_last_pid");
    }
    let (ready_r, ready_w) = {
        let mut fds = [0; 2];
        // SAFETY: a live 2-int array.
        check(unsafe { libc::pipe(fds.as_mut_ptr()) } as libc::c_long, "pipe");
        (fds[0], fds[1])
    };
    // SAFETY: single-threaded process.
    let victim = unsafe { libc::fork() };
    check(victim as libc::c_long, "fork victim");
    if victim == 0 {
        become_uid(args.victim_uid);
        let mut memory = vec![0u8; args.victim_bytes];
        for i in (0..memory.len()).step_by(4096) {
            memory[i] = 1;
        }
        // SAFETY: writing one byte from a live buffer.
        unsafe { libc::write(ready_w, b"r".as_ptr().cast(), 1) };
        loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a live buffer.
    unsafe { libc::read(ready_r, byte.as_mut_ptr().cast(), 1) };

    // SAFETY: single-threaded process.
    let client = unsafe { libc::fork() };
    check(client as libc::c_long, "fork client");
    if client == 0 {
        if let Some(socket) = &args.varlink {
            let pidns = std::fs::File::open("/proc/self/ns/pid").expect("open /proc/self/ns/pid");
            become_uid(args.uid);
            let method = if args.check { "CheckPermission" } else { "KillAndReap" };
            let mut fds = Vec::new();
            let mut params = Vec::new();
            match &host_pidfd {
                Some(fd) => {
                    params.push(format!("\"pidfd\":{}", fds.len()));
                    fds.push(fd.as_raw_fd());
                }
                None => params.push(format!("\"pid\":{}", args.target_pid.unwrap_or(victim))),
            }
            if !args.check {
                // The reply then comes after the victim exited, so its fate
                // is known when the client returns.
                params.push("\"waitForExitMs\":5000".to_string());
            }
            let pidns_file = args
                .pidns_file
                .as_ref()
                .map(|path| std::fs::File::open(path).expect("open the --pidns-file"));
            if let Some(file) = &pidns_file {
                params.push(format!("\"pidns\":{}", fds.len()));
                fds.push(file.as_raw_fd());
            } else if let Some(host) = &host_pidns {
                params.push(format!("\"pidns\":{}", fds.len()));
                fds.push(host.as_raw_fd());
            } else if args.pidns {
                params.push(format!("\"pidns\":{}", fds.len()));
                fds.push(pidns.as_raw_fd());
            }
            let message = format!(
                "{{\"method\":\"io.reapd.Reaper.{method}\",\"parameters\":{{{}}}}}",
                params.join(",")
            );
            let reply = varlink_call(socket, &message, &fds);
            println!("{reply}");
            std::process::exit(0);
        }
        become_uid(args.uid);
        let argv: Vec<CString> = args
            .command
            .iter()
            .map(|a| CString::new(a.replace("{victim}", &victim.to_string())).unwrap())
            .collect();
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: argv is a NULL-terminated array of live C strings.
        unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
        eprintln!(
            "ns-caller: exec {}: {}",
            args.command[0],
            std::io::Error::last_os_error()
        );
        std::process::exit(97);
    }
    let status = wait(client, 0).unwrap_or(0);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let signal = match wait(victim, libc::WNOHANG) {
        Some(s) if libc::WIFSIGNALED(s) => libc::WTERMSIG(s),
        _ => {
            // SAFETY: killing our own child.
            unsafe { libc::kill(victim, libc::SIGKILL) };
            wait(victim, 0);
            0
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ns-caller: victim={victim} signal={signal} exit={code}");
    let _ = out.flush();
}

/// The `--userns` mode: the client is root of a user namespace whose uids
/// map to `base..base+10`, and the victim one of that namespace's users.
fn userns_main(args: &Args, base: u32) -> ! {
    let (go_r, go_w) = {
        let mut fds = [0; 2];
        // SAFETY: a live 2-int array.
        check(unsafe { libc::pipe(fds.as_mut_ptr()) } as libc::c_long, "pipe");
        (fds[0], fds[1])
    };
    let (done_r, done_w) = {
        let mut fds = [0; 2];
        // SAFETY: a live 2-int array.
        check(unsafe { libc::pipe(fds.as_mut_ptr()) } as libc::c_long, "pipe");
        (fds[0], fds[1])
    };
    // SAFETY: single-threaded process.
    let child = unsafe { libc::fork() };
    check(child as libc::c_long, "fork");
    if child > 0 {
        let mut byte = [0u8; 1];
        // Wait until the child has its namespace, then map it.
        // SAFETY: reading one byte into a live buffer.
        unsafe { libc::read(done_r, byte.as_mut_ptr().cast(), 1) };
        std::fs::write(format!("/proc/{child}/uid_map"), format!("0 {base} 10\n")).expect("uid_map");
        std::fs::write(format!("/proc/{child}/setgroups"), "deny").expect("setgroups");
        std::fs::write(format!("/proc/{child}/gid_map"), format!("0 {base} 10\n")).expect("gid_map");
        // SAFETY: writing one byte from a live buffer.
        unsafe { libc::write(go_w, b"g".as_ptr().cast(), 1) };
        let status = wait(child, 0).unwrap_or(0);
        std::process::exit(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            98
        });
    }
    // SAFETY: unshare has no memory arguments.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long,
        "unshare(CLONE_NEWUSER)",
    );
    let mut byte = [0u8; 1];
    // SAFETY: one-byte reads and writes on live buffers.
    unsafe {
        libc::write(done_w, b"u".as_ptr().cast(), 1);
        libc::read(go_r, byte.as_mut_ptr().cast(), 1);
        check(
            libc::syscall(libc::SYS_setresgid, 0, 0, 0),
            "setresgid in the namespace",
        );
        check(
            libc::syscall(libc::SYS_setresuid, 0, 0, 0),
            "setresuid in the namespace",
        );
    }
    let (ready_r, ready_w) = {
        let mut fds = [0; 2];
        // SAFETY: a live 2-int array.
        check(unsafe { libc::pipe(fds.as_mut_ptr()) } as libc::c_long, "pipe");
        (fds[0], fds[1])
    };
    // SAFETY: single-threaded process.
    let victim = unsafe { libc::fork() };
    check(victim as libc::c_long, "fork victim");
    if victim == 0 {
        // SAFETY: credential syscalls and a one-byte write, then pause.
        unsafe {
            check(
                libc::syscall(libc::SYS_setresgid, args.victim_uid, args.victim_uid, args.victim_uid),
                "victim gid",
            );
            check(
                libc::syscall(libc::SYS_setresuid, args.victim_uid, args.victim_uid, args.victim_uid),
                "victim uid",
            );
            libc::write(ready_w, b"r".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: reading one byte into a live buffer.
    unsafe { libc::read(ready_r, byte.as_mut_ptr().cast(), 1) };
    // SAFETY: single-threaded process.
    let client = unsafe { libc::fork() };
    check(client as libc::c_long, "fork client");
    if client == 0 {
        let argv: Vec<CString> = args
            .command
            .iter()
            .map(|a| CString::new(a.replace("{victim}", &victim.to_string())).unwrap())
            .collect();
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: argv is a NULL-terminated array of live C strings.
        unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
        std::process::exit(97);
    }
    let status = wait(client, 0).unwrap_or(0);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let signal = match wait(victim, libc::WNOHANG) {
        Some(s) if libc::WIFSIGNALED(s) => libc::WTERMSIG(s),
        _ => {
            // SAFETY: killing our own child.
            unsafe { libc::kill(victim, libc::SIGKILL) };
            wait(victim, 0);
            0
        }
    };
    println!("ns-caller: victim={victim} signal={signal} exit={code}");
    std::process::exit(0);
}
