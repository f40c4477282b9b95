// SPDX-License-Identifier: MIT OR Apache-2.0
//! `robust-victim BYTES`: a victim that holds a process-shared robust mutex,
//! and a peer blocked on it, for the reap-delay test. Single-threaded.
//!
//! Prints the victim's pid on the first line once the peer sleeps on the
//! mutex, then, once the peer's wait
//! ends (at most 10 s), `peer: EOWNERDEAD` (the victim's exit path handed the
//! mutex on, as it must), `peer: ETIMEDOUT` (the hand-over was lost: the
//! robust list was destroyed before the exit path ran) or `peer: <errno>`.

use std::io::Write;

fn main() {
    let bytes: usize = std::env::args().nth(1).and_then(|b| b.parse().ok()).unwrap_or(1 << 20);
    // SAFETY: a fresh shared anonymous mapping holding one pthread mutex,
    // initialised before any other process exists; the victim and the peer
    // (forked below) use it only through the pthread API.
    unsafe {
        let size = std::mem::size_of::<libc::pthread_mutex_t>();
        let shared = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(shared, libc::MAP_FAILED);
        let mutex = shared as *mut libc::pthread_mutex_t;
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        libc::pthread_mutexattr_init(&mut attr);
        libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
        libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
        assert_eq!(libc::pthread_mutex_init(mutex, &attr), 0);

        let mut ready = [0; 2];
        assert_eq!(libc::pipe(ready.as_mut_ptr()), 0);
        let victim = libc::fork();
        assert!(victim >= 0);
        if victim == 0 {
            assert_eq!(libc::pthread_mutex_lock(mutex), 0);
            let mut memory = vec![0u8; bytes];
            for i in (0..memory.len()).step_by(4096) {
                memory[i] = 1;
            }
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
        let mut byte = [0u8; 1];
        assert_eq!(libc::read(ready[0], byte.as_mut_ptr().cast(), 1), 1);
        let peer = libc::fork();
        assert!(peer >= 0);
        if peer == 0 {
            let mut deadline: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_REALTIME, &mut deadline);
            deadline.tv_sec += 10;
            let ret = libc::pthread_mutex_timedlock(mutex, &deadline);
            let what = match ret {
                libc::EOWNERDEAD => "EOWNERDEAD".to_string(),
                libc::ETIMEDOUT => "ETIMEDOUT".to_string(),
                other => other.to_string(),
            };
            let mut out = std::io::stdout();
            let _ = writeln!(out, "peer: {what}");
            let _ = out.flush();
            libc::_exit(0);
        }
        // Announce the victim once the peer is asleep on the mutex (its
        // wait channel names a futex), so the kill finds a real waiter.
        let wchan = format!("/proc/{peer}/wchan");
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&wchan).unwrap_or_default().contains("futex")
            && start.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::yield_now();
        }
        let mut out = std::io::stdout();
        writeln!(out, "{victim}").unwrap();
        out.flush().unwrap();
        let mut status = 0;
        libc::waitpid(peer, &mut status, 0);
        libc::kill(victim, libc::SIGKILL);
        libc::waitpid(victim, &mut status, 0);
    }
}
