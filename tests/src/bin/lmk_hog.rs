//! `lmk-hog NAME HOLD_MIB [STEP_MIB STEP_MS MAX_MIB]`: a memory hog for the
//! low-memory killer tests. Names itself NAME (comm), touches HOLD_MIB of
//! private anonymous memory, prints `ready`, then (with a step) grows by
//! STEP_MIB every STEP_MS until it holds MAX_MIB (0: without end), and then
//! sleeps until killed. The pacing is the workload's, not a test's wait.

use std::io::Write;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn touch(held: &mut Vec<Vec<u8>>, mib: usize) {
    for _ in 0..mib {
        // vec![1; MIB] writes every page: resident, not just reserved.
        held.push(vec![1u8; MIB]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<usize>().ok()).unwrap_or(0);
    let name = std::ffi::CString::new(args.get(1).cloned().unwrap_or_default()).unwrap();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string that outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let mut held = Vec::new();
    touch(&mut held, num(2));
    println!("ready");
    std::io::stdout().flush().unwrap();
    let (step, every, max) = (num(3), num(4), num(5));
    while step > 0 && (max == 0 || held.len() < max) {
        std::thread::sleep(Duration::from_millis(every as u64));
        touch(&mut held, step);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
