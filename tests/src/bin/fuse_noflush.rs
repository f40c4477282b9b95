// SPDX-License-Identifier: MIT OR Apache-2.0
//! `fuse-noflush MOUNTDIR VARLINK_SOCKET UID CALLS`: a FUSE filesystem that
//! never answers FLUSH, and a client that sends fds of its one file to the
//! broker.
//!
//! In a private mount namespace it mounts a filesystem with one file, `f`,
//! served straight over /dev/fuse, owned (`user_id=`) by UID. A child under
//! UID opens `f` CALLS times and passes each fd with a varlink
//! CheckPermission naming it as the pidfd, printing `reply NAME` (the error
//! name, or `ok`) per call, then `done`, and keeps its fds (closing one
//! would wait for FLUSH forever). The server answers everything else and
//! never FLUSH, until it is killed, which aborts the connection and ends
//! every wait. Prints `SKIP: reason` and exits 77 if FUSE is unavailable.

use std::io::Write;
use std::os::fd::AsRawFd;

use reapd_e2e::fuse::{self, Files};

fn skip(reason: &str) -> ! {
    println!("SKIP: {reason}");
    std::process::exit(77);
}

fn serve(dev: std::fs::File, uid: u32) -> ! {
    let files = Files { size: 0, uid };
    let mut buf = vec![0u8; (1 << 20) + 4096];
    while let Some(request) = fuse::next_request(&dev, &mut buf) {
        match request.opcode {
            fuse::LOOKUP if fuse::lookup_name(&request) == b"f" => fuse::reply_entry(&dev, request.unique, 2, files),
            fuse::LOOKUP => fuse::reply(&dev, request.unique, -libc::ENOENT, &[]),
            // The point of this filesystem.
            fuse::FLUSH => {}
            _ => fuse::answer(&dev, &request, files),
        }
    }
    std::process::exit(0)
}

/// The sender: under `uid`, opens the file `calls` times and passes each fd.
fn send(mountdir: &str, socket: &str, uid: u32, calls: usize) -> ! {
    // SAFETY: plain credential syscalls in a single-threaded child.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(uid, uid, uid) == 0
            && libc::setresuid(uid, uid, uid) == 0
    };
    if !ok {
        println!("SKIP: cannot become uid {uid}");
        std::process::exit(77);
    }
    let mut kept = Vec::new();
    let mut stdout = std::io::stdout();
    for _ in 0..calls {
        let file = match std::fs::File::open(format!("{mountdir}/f")) {
            Ok(file) => file,
            Err(err) => {
                let _ = writeln!(stdout, "SKIP: cannot open a file on the FUSE mount: {err}");
                std::process::exit(77);
            }
        };
        let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect to the broker");
        let message = b"{\"method\":\"io.reapd.Reaper.CheckPermission\",\"parameters\":{\"pidfd\":0}}\0";
        let fd = file.as_raw_fd();
        // SAFETY: sendmsg with a control buffer sized by CMSG_SPACE for one
        // int; every pointer is to live local data.
        unsafe {
            let mut control = [0u8; 64];
            let mut iov = libc::iovec {
                iov_base: message.as_ptr() as *mut libc::c_void,
                iov_len: message.len(),
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
            std::ptr::copy_nonoverlapping(&fd, libc::CMSG_DATA(cmsg) as *mut i32, 1);
            assert_eq!(
                libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL),
                message.len() as isize
            );
        }
        let mut data = Vec::new();
        let mut byte = [0u8; 1];
        while let Ok(1) = std::io::Read::read(&mut &stream, &mut byte) {
            if byte[0] == 0 {
                break;
            }
            data.push(byte[0]);
        }
        let value: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
        let name = value.get("error").and_then(|e| e.as_str()).unwrap_or("ok").to_string();
        let _ = writeln!(stdout, "reply {name}");
        let _ = stdout.flush();
        kept.push(file);
    }
    let _ = writeln!(stdout, "done");
    let _ = stdout.flush();
    // Closing a file here would wait for FLUSH too: keep them, wait to be
    // killed.
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: fuse-noflush MOUNTDIR VARLINK_SOCKET UID CALLS");
        std::process::exit(2);
    }
    let (mountdir, socket) = (&args[1], &args[2]);
    let uid: u32 = args[3].parse().expect("uid");
    let calls: usize = args[4].parse().expect("calls");
    // SAFETY: unshare with a constant flag; single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        skip(&format!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error()));
    }
    if let Err(err) = fuse::make_mounts_private() {
        skip(&format!("making / private: {err}"));
    }
    let dev = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(dev) => dev,
        Err(err) => skip(&format!("cannot open /dev/fuse: {err}")),
    };
    if let Err(err) = fuse::mount(&dev, mountdir, "reapd-noflush", uid) {
        skip(&format!("mount -t fuse: {err}"));
    }
    // SAFETY: fork from a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // Only the server holds /dev/fuse: killing it aborts the connection.
        drop(dev);
        send(mountdir, socket, uid, calls);
    }
    serve(dev, uid);
}
