// SPDX-License-Identifier: MIT OR Apache-2.0
//! `bytes_released` is what the kill gave back to the system (issue 12,
//! "honest figures"), checked against the change in the system's own
//! counters (`/proc/meminfo` AnonPages + used swap) measured by the test
//! around the call: a plain victim, a victim whose leader has exited, a
//! copy-on-write child, and two concurrent kills of one victim.

use std::io::Read;
use std::process::{Child, Command, Stdio};

use reapd_e2e::{Broker, Creds, CtlResult};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
/// Other processes allocate and free while the test runs (the broker,
/// reapctl, the test harness); the counters also lag by per-CPU batches.
const SLACK: u64 = 24 * MIB;
/// The test's own reading of the counters spans more than the broker's
/// (process start-up, reply, exit), so other processes' activity shows
/// more there: compared with this wider margin.
const OUTER_SLACK: u64 = 64 * MIB;

/// The figures are system-wide counters: the tests of this file must not
/// allocate or free beside each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn system_anon_and_swap() -> u64 {
    reapd::os::procfs::system_anon_and_swap().expect("/proc/meminfo")
}

/// A python3 victim running `body` (which must print its pid to kill, then
/// sleep), as uid 61400. Returns the child and the pid it printed.
fn python_victim(body: &str) -> (Child, i32) {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(body)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let stdout = child.stdout.as_mut().unwrap();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    let pid = line.trim().parse().unwrap_or_else(|_| panic!("victim said {line:?}"));
    (child, pid)
}

const TOUCH: &str = "import ctypes, mmap, os, sys, threading, time\n\
os.setresgid(61400, 61400, 61400); os.setresuid(61400, 61400, 61400)\n\
def touch(n):\n\
\x20   m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n\
\x20   for i in range(0, n, 4096): m[i] = 1\n\
\x20   return m\n";

fn kill(broker: &Broker, pid: i32) -> (CtlResult, u64) {
    let before = system_anon_and_swap();
    let r = broker.reapctl(Creds::ROOT, &["kill", &pid.to_string(), "--wait", "5000"]);
    let after = system_anon_and_swap();
    (r, before.saturating_sub(after))
}

fn released(r: &CtlResult) -> u64 {
    r.json["bytes_released"].as_u64().unwrap_or_else(|| panic!("{r:?}"))
}

#[test]
fn a_plain_victim_releases_what_the_system_gets_back() {
    let _serial = serial();
    let broker = Broker::start();
    let (mut child, pid) = python_victim(&format!(
        "{TOUCH}m = touch({SIZE})\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n"
    ));
    let (r, dropped) = kill(&broker, pid);
    assert_eq!(r.code, 0, "{r:?}");
    let got = released(&r);
    assert!(
        got + SLACK >= SIZE && got <= SIZE + SLACK,
        "released {got}, size {SIZE}: {r:?}"
    );
    assert!(
        got.abs_diff(dropped) <= OUTER_SLACK,
        "released {got}, the system got back {dropped}"
    );
    let _ = child.wait();
}

#[test]
fn a_victim_whose_leader_exited_reports_its_memory() {
    let _serial = serial();
    let broker = Broker::start();
    // The main thread calls pthread_exit(): the leader is a zombie with no
    // mm, while a worker thread keeps the address space alive.
    let (mut child, pid) = python_victim(&format!(
        "{TOUCH}m = touch({SIZE})\n\
         threading.Thread(target=lambda: time.sleep(600)).start()\n\
         print(os.getpid(), flush=True)\n\
         ctypes.CDLL(None).pthread_exit(None)\n"
    ));
    // Wait for the leader to have exited (observable: its state is Z).
    let stat = format!("/proc/{pid}/stat");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&stat).unwrap_or_default().contains(") Z") {
        assert!(std::time::Instant::now() < deadline, "the leader did not exit");
        std::thread::yield_now();
    }
    let (r, dropped) = kill(&broker, pid);
    assert_eq!(r.code, 0, "{r:?}");
    let before = r.json["memory_before"]["anon_bytes"].as_u64().unwrap();
    assert!(
        before + SLACK >= SIZE,
        "memory_before {before}: read from a live thread"
    );
    let got = released(&r);
    assert!(got + SLACK >= SIZE, "released {got}");
    assert!(
        got.abs_diff(dropped) <= OUTER_SLACK,
        "released {got}, the system got back {dropped}"
    );
    let _ = child.wait();
}

#[test]
fn a_copy_on_write_child_releases_nothing_its_parent_still_maps() {
    let _serial = serial();
    let broker = Broker::start();
    // The parent touches the memory and forks; the child shares every page
    // copy-on-write and prints its pid.
    let (mut parent, child_pid) = python_victim(&format!(
        "{TOUCH}m = touch({SIZE})\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   time.sleep(600)\n\
         print(pid, flush=True)\n\
         time.sleep(600)\n"
    ));
    let (r, dropped) = kill(&broker, child_pid);
    assert_eq!(r.code, 0, "{r:?}");
    let before = r.json["memory_before"]["anon_bytes"].as_u64().unwrap();
    assert!(before + SLACK >= SIZE, "the child maps {before}");
    let got = released(&r);
    assert!(got <= SLACK, "released {got}: the parent still maps those pages");
    assert!(dropped <= SLACK, "the system got back {dropped}");
    assert!(matches!(parent.try_wait(), Ok(None)), "the parent lives");
    let _ = parent.kill();
    let _ = parent.wait();
}

#[test]
fn two_concurrent_kills_of_one_victim_count_its_memory_once() {
    let _serial = serial();
    let broker = Broker::start();
    let size = 4 * SIZE;
    let (mut child, pid) = python_victim(&format!(
        "{TOUCH}m = touch({size})\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n"
    ));
    let before = system_anon_and_swap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| broker.reapctl(Creds::ROOT, &["kill", &pid.to_string(), "--wait", "5000"]));
        let b = s.spawn(|| broker.reapctl(Creds::ROOT, &["kill", &pid.to_string(), "--wait", "5000"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let dropped = before.saturating_sub(system_anon_and_swap());
    // The one that lost the race either found another kill under way
    // (already_dying, 0), or found the process gone (no such process), or
    // reaped what little was left: never the whole amount again.
    let total: u64 = [&a, &b].iter().filter(|r| r.code == 0).map(|r| released(r)).sum();
    assert!(
        total <= size + SLACK,
        "counted {total} for a {size}-byte victim: {a:?} {b:?}"
    );
    assert!(
        total.abs_diff(dropped) <= OUTER_SLACK,
        "counted {total}, the system got back {dropped}: {a:?} {b:?}"
    );
    let outcomes: Vec<&str> = [&a, &b]
        .iter()
        .map(|r| {
            r.json["outcome"]
                .as_str()
                .unwrap_or(r.json["error"].as_str().unwrap_or("?"))
        })
        .collect();
    assert!(
        outcomes.iter().any(|o| *o == "reaped" || *o == "exited_before_reap"),
        "{outcomes:?}"
    );
    let _ = child.wait();
}

/// With a reap delay the victim's exit path runs before any reap, so a peer
/// blocked on a process-shared robust mutex the victim held gets
/// EOWNERDEAD (issue 12, robust futexes).
#[test]
fn with_a_reap_delay_a_robust_mutex_waiter_gets_eownerdead() {
    let _serial = serial();
    let broker = Broker::start();
    let socket = reapd_e2e::varlink_socket(&broker);
    for round in 0..3 {
        let mut helper = Command::new(reapd_e2e::bin("robust-victim"))
            .arg((64 * MIB).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("robust-victim");
        let stdout = helper.stdout.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let pid: i32 = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let reply = reapd_e2e::varlink_call_as(
            Creds::ROOT,
            &socket,
            &format!(r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{pid},"reapDelayMs":2000}}}}"#),
            &[],
        );
        assert!(reply["parameters"]["outcome"].is_string(), "{reply}");
        let peer = lines.next().unwrap().unwrap();
        assert_eq!(peer, "peer: EOWNERDEAD", "round {round}: {reply}");
        let _ = helper.wait();
    }
}
