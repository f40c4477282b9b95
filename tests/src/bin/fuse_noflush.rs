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

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;

fn skip(reason: &str) -> ! {
    println!("SKIP: {reason}");
    std::process::exit(77);
}

fn attr(out: &mut Vec<u8>, ino: u64, mode: u32, uid: u32) {
    for v in [ino, 0u64, 0, 0, 0, 0] {
        out.extend_from_slice(&v.to_ne_bytes()); // ino size blocks atime mtime ctime
    }
    for v in [0u32, 0, 0, mode, 1, uid, uid, 0, 4096, 0] {
        out.extend_from_slice(&v.to_ne_bytes()); // nsecs, mode nlink uid gid rdev blksize flags
    }
}

fn reply(dev: &std::fs::File, unique: u64, error: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&error.to_ne_bytes());
    out.extend_from_slice(&unique.to_ne_bytes());
    out.extend_from_slice(body);
    let _ = (&*dev).write(&out);
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
}

fn serve(dev: std::fs::File, uid: u32) -> ! {
    let mut buf = vec![0u8; (1 << 20) + 4096];
    loop {
        let n = match std::io::Read::read(&mut &dev, &mut buf) {
            Ok(n) => n,
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(_) => std::process::exit(0),
        };
        if n < 40 {
            continue;
        }
        let opcode = u32_at(&buf, 4);
        let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap());
        let nodeid = u64::from_ne_bytes(buf[16..24].try_into().unwrap());
        let body = &buf[40..n];
        match opcode {
            FUSE_INIT => {
                let max_readahead = u32_at(body, 8);
                let mut out = Vec::new();
                for v in [7u32, 31, max_readahead, 0] {
                    out.extend_from_slice(&v.to_ne_bytes());
                }
                out.extend_from_slice(&16u16.to_ne_bytes()); // max_background
                out.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
                out.extend_from_slice(&4096u32.to_ne_bytes()); // max_write
                out.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
                out.extend_from_slice(&1u16.to_ne_bytes()); // max_pages
                out.extend_from_slice(&0u16.to_ne_bytes()); // map_alignment
                out.resize(64, 0);
                reply(&dev, unique, 0, &out);
            }
            FUSE_LOOKUP => {
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                if name == b"f" {
                    let mut out = Vec::new();
                    for v in [2u64, 0, 3600, 3600] {
                        out.extend_from_slice(&v.to_ne_bytes());
                    }
                    out.extend_from_slice(&[0u8; 8]);
                    attr(&mut out, 2, libc::S_IFREG | 0o644, uid);
                    reply(&dev, unique, 0, &out);
                } else {
                    reply(&dev, unique, -libc::ENOENT, &[]);
                }
            }
            FUSE_GETATTR => {
                let mut out = Vec::new();
                out.extend_from_slice(&3600u64.to_ne_bytes());
                out.extend_from_slice(&[0u8; 8]);
                let mode = if nodeid == 1 {
                    libc::S_IFDIR | 0o755
                } else {
                    libc::S_IFREG | 0o644
                };
                attr(&mut out, nodeid, mode, uid);
                reply(&dev, unique, 0, &out);
            }
            FUSE_OPEN => {
                let mut out = Vec::new();
                out.extend_from_slice(&1u64.to_ne_bytes());
                out.extend_from_slice(&[0u8; 8]);
                reply(&dev, unique, 0, &out);
            }
            // The point of this filesystem.
            FUSE_FLUSH => {}
            FUSE_RELEASE => reply(&dev, unique, 0, &[]),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => {}
            _ => reply(&dev, unique, -libc::ENOSYS, &[]),
        }
    }
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
    // SAFETY: unshare and mount with valid C strings; single-threaded here.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            skip(&format!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error()));
        }
        let root = CString::new("/").unwrap();
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            skip(&format!("making / private: {}", std::io::Error::last_os_error()));
        }
    }
    let dev = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(dev) => dev,
        Err(err) => skip(&format!("cannot open /dev/fuse: {err}")),
    };
    let options = CString::new(format!(
        "fd={},rootmode=40000,user_id={uid},group_id={uid}",
        dev.as_raw_fd()
    ))
    .unwrap();
    let target = CString::new(mountdir.as_str()).unwrap();
    let source = CString::new("reapd-noflush").unwrap();
    let fstype = CString::new("fuse").unwrap();
    // SAFETY: valid C strings; the options name our open /dev/fuse fd.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr() as *const libc::c_void,
        )
    };
    if mounted != 0 {
        skip(&format!("mount -t fuse: {}", std::io::Error::last_os_error()));
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
