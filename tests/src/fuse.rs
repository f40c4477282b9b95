// SPDX-License-Identifier: MIT OR Apache-2.0
//! A FUSE server spoken straight over /dev/fuse, for the test helpers whose
//! filesystems withhold one answer (tests/src/bin/fuse_noflush.rs: FLUSH;
//! fuse_stall.rs: READ). The root directory (node 1) holds regular files;
//! what each helper answers to LOOKUP and to its withheld request is its
//! own, everything else is answered here.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const RELEASE: u32 = 18;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const INTERRUPT: u32 = 36;
pub const BATCH_FORGET: u32 = 42;

/// One request read from the device.
pub struct Request<'a> {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub body: &'a [u8],
}

/// The filesystem's files: their size and owner (in the mount's user
/// namespace).
#[derive(Debug, Clone, Copy)]
pub struct Files {
    pub size: u64,
    pub uid: u32,
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap())
}

/// The next request, or `None` when the connection is gone.
pub fn next_request<'a>(dev: &std::fs::File, buf: &'a mut [u8]) -> Option<Request<'a>> {
    loop {
        let n = match (&*dev).read(buf) {
            Ok(n) => n,
            Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::ENOENT)) => continue,
            Err(_) => return None,
        };
        if n >= 40 {
            let (opcode, unique, nodeid) = (u32_at(buf, 4), u64_at(buf, 8), u64_at(buf, 16));
            return Some(Request {
                opcode,
                unique,
                nodeid,
                body: &buf[40..n],
            });
        }
    }
}

pub fn reply(dev: &std::fs::File, unique: u64, error: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&error.to_ne_bytes());
    out.extend_from_slice(&unique.to_ne_bytes());
    out.extend_from_slice(body);
    let _ = (&*dev).write(&out);
}

fn attr(out: &mut Vec<u8>, ino: u64, files: Files) {
    let (size, mode) = if ino == 1 {
        (0, libc::S_IFDIR | 0o755)
    } else {
        (files.size, libc::S_IFREG | 0o644)
    };
    for v in [ino, size, 0, 0, 0, 0] {
        out.extend_from_slice(&v.to_ne_bytes()); // ino size blocks atime mtime ctime
    }
    for v in [0u32, 0, 0, mode, 1, files.uid, files.uid, 0, 4096, 0] {
        out.extend_from_slice(&v.to_ne_bytes()); // nsecs, mode nlink uid gid rdev blksize flags
    }
}

/// Answers LOOKUP with the file `nodeid`.
pub fn reply_entry(dev: &std::fs::File, unique: u64, nodeid: u64, files: Files) {
    let mut out = Vec::new();
    for v in [nodeid, 0, 3600, 3600] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(&[0u8; 8]);
    attr(&mut out, nodeid, files);
    reply(dev, unique, 0, &out);
}

/// Answers what every helper answers alike (INIT, GETATTR, OPEN, FLUSH,
/// RELEASE; FORGET and INTERRUPT need none) and refuses what none knows
/// (ENOSYS); a helper handles LOOKUP and what it withholds before this.
pub fn answer(dev: &std::fs::File, request: &Request<'_>, files: Files) {
    let unique = request.unique;
    match request.opcode {
        INIT => {
            let max_readahead = u32_at(request.body, 8);
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
            reply(dev, unique, 0, &out);
        }
        GETATTR => {
            let mut out = Vec::new();
            out.extend_from_slice(&3600u64.to_ne_bytes());
            out.extend_from_slice(&[0u8; 8]);
            attr(&mut out, request.nodeid, files);
            reply(dev, unique, 0, &out);
        }
        OPEN => {
            let mut out = Vec::new();
            out.extend_from_slice(&1u64.to_ne_bytes());
            out.extend_from_slice(&[0u8; 8]);
            reply(dev, unique, 0, &out);
        }
        FLUSH | RELEASE => reply(dev, unique, 0, &[]),
        FORGET | BATCH_FORGET | INTERRUPT => {}
        _ => reply(dev, unique, -libc::ENOSYS, &[]),
    }
}

/// The name a LOOKUP asks for.
pub fn lookup_name<'a>(request: &Request<'a>) -> &'a [u8] {
    request.body.split(|&b| b == 0).next().unwrap_or_default()
}

/// Makes this process's mount namespace (its own, unshared) private, so
/// its mounts stay in it.
pub fn make_mounts_private() -> std::io::Result<()> {
    let root = CString::new("/").unwrap();
    // SAFETY: valid C string, null optional arguments.
    let done = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts a FUSE filesystem served over `dev` on `mountdir`, its files
/// owned by `owner` (a uid of the mounting user namespace).
pub fn mount(dev: &std::fs::File, mountdir: &str, name: &str, owner: u32) -> std::io::Result<()> {
    let options = CString::new(format!(
        "fd={},rootmode=40000,user_id={owner},group_id={owner}",
        dev.as_raw_fd()
    ))
    .unwrap();
    let target = CString::new(mountdir).unwrap();
    let source = CString::new(name).unwrap();
    let fstype = CString::new("fuse").unwrap();
    // SAFETY: valid C strings; the options name our open device fd.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr() as *const libc::c_void,
        )
    };
    if mounted == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
