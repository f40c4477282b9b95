// SPDX-License-Identifier: MIT OR Apache-2.0
//! `zero-page-victim GIB`: a process that is "small" to the broker yet slow
//! to reap. It maps GIB GiB of private anonymous memory without huge pages
//! and read-faults all of it (MADV_POPULATE_READ): every PTE then points at
//! the shared zero page, which no RSS counter includes (RssAnon stays
//! ~100 kB), but the page tables are real (2 MiB per GiB) and
//! `process_mrelease(2)` clears every one of those PTEs. Prints `ready`
//! once populated, then sleeps until killed. `zero-page-victim GIB MIB`
//! also dirties MIB MiB of ordinary anonymous memory.

use std::io::Write;

const MADV_POPULATE_READ: libc::c_int = 22;

fn main() {
    let gib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: zero-page-victim GIB");
    let dirty: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(0);
    let len = gib << 30;
    let ballast = vec![1u8; dirty << 20];
    // SAFETY: a fresh anonymous mapping, never dereferenced here; the
    // kernel populates it.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert_ne!(m, libc::MAP_FAILED, "mmap {gib} GiB");
        // Huge pages would map the huge zero page with one PMD: no PTEs.
        assert_eq!(libc::madvise(m, len, libc::MADV_NOHUGEPAGE), 0);
        assert_eq!(libc::madvise(m, len, MADV_POPULATE_READ), 0, "MADV_POPULATE_READ");
    }
    std::hint::black_box(&ballast);
    println!("ready");
    std::io::stdout().flush().unwrap();
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}
