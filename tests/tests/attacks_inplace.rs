// SPDX-License-Identifier: MIT OR Apache-2.0
//! Attacks on the in-place kill path (issue 17): a "small" KillAndReap once
//! ran SIGKILL, process_mrelease and its audit on the async worker itself,
//! one at a time. A victim can be small by every RSS counter yet slow to
//! reap (page tables full of zero-page PTEs, see
//! tests/src/bin/zero_page_victim.rs): before the broker counted page
//! tables (`VmPTE`) such a kill held an async worker for the whole reap
//! (200-340 ms for 64 GiB). Every reap now runs on a reaper thread
//! (engine::reap_pool, branch reaphold), so no kill holds an async worker;
//! these tests stay as regressions: every other caller must be served
//! meanwhile, on both transports, and a flood of kills loses no record.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reapd_e2e::{bin, run_as, spawn_as, Broker, Creds, Victim};

const VICTIMS: u32 = 61801;

/// What the in-place path took for a small reap (anon + file + shmem +
/// swap): the victim must be small by that measure for the test to mean
/// anything.
const SMALL_REAP_BYTES: u64 = 16 << 20;
const BYSTANDER: u32 = 61802;

const OPEN_POLICY: &str =
    "[defaults]\nkill-rule = true\ncheck = \"anyone\"\n\n[limits]\nkills = 1000\nburst = 1000\nmax-in-flight = 100\n";

fn start() -> Broker {
    let file = reapd_e2e::policy_file(OPEN_POLICY);
    let broker = Broker::start_with(&["--policy", file.path().to_str().unwrap()], &[]);
    reapd_e2e::wait_for_varlink(&broker);
    std::mem::forget(file);
    broker
}

/// Zero-page victims, killed if the test ends early (they are not our
/// children's children: a leak would hold the test's stderr open).
struct Victims(Vec<Child>);

impl Drop for Victims {
    fn drop(&mut self) {
        for v in &mut self.0 {
            let _ = v.kill();
            let _ = v.wait();
        }
    }
}

/// A zero-page victim of `gib` GiB of address space, populated.
fn zero_page_victim(gib: usize) -> Child {
    let mut cmd = Command::new(bin("zero-page-victim"));
    cmd.arg(gib.to_string()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = spawn_as(Creds::uid(VICTIMS), &[], &mut cmd);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "zero-page victim did not populate");
    child
}

/// What the broker counts as reap work (anon + file + shmem + swap), and
/// the page tables it does not count, from /proc/PID/status.
fn status_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        field("RssAnon:") + field("RssFile:") + field("RssShmem:") + field("VmSwap:"),
        field("VmPTE:"),
    )
}

/// One bystander call (CheckPermission on its own process) over `varlink`
/// or gRPC, as a fresh reapctl; its wall time.
fn check(broker: &Broker, varlink: bool, pid: i32) -> Duration {
    let mut command = reapd_e2e::reapctl_over(broker, varlink);
    command.args(["--timeout", "10", "check", &pid.to_string()]);
    let t = Instant::now();
    let out = run_as(Creds::uid(BYSTANDER), &mut command);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    took
}

/// Calls of a looping bystander: (start, wall time).
type Calls = Vec<(Instant, Duration)>;

fn bystander_loop(
    broker: Arc<Broker>,
    varlink: bool,
    pid: i32,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Calls> {
    std::thread::spawn(move || {
        let mut calls = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let t = Instant::now();
            calls.push((t, check(&broker, varlink, pid)));
            done.fetch_add(1, Ordering::SeqCst);
        }
        calls
    })
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    assert!(
        reapd_e2e::wait_until(Duration::from_secs(30), cond),
        "timed out waiting for {what}"
    );
}

/// A victim with ~1 MiB resident but 16 GiB of zero-page PTEs (32 MiB of
/// page tables) is small by every Rss line; its reap takes ~45 ms. It
/// must not be reaped on an async worker (no reap is now), and
/// meanwhile another uid's CheckPermission calls, over varlink and gRPC,
/// must stay within 100 ms of their unloaded wall time.
#[test]
fn a_victim_small_by_rss_but_slow_to_reap_is_handed_off_and_stalls_no_other_caller() {
    slow_small_kills_leave_bystanders_served(1, 16);
}

fn slow_small_kills_leave_bystanders_served(count: usize, gib: usize) {
    let broker = Arc::new(start());
    let bystander = Victim::spawn(Creds::uid(BYSTANDER), 0);
    let mut victims = Victims((0..count).map(|_| zero_page_victim(gib)).collect());
    for victim in &victims.0 {
        let (work_kib, pte_kib) = status_kib(victim.id());
        assert!(work_kib * 1024 <= SMALL_REAP_BYTES, "not small by Rss: {work_kib} kB");
        eprintln!("victim: {work_kib} kB counted, {pte_kib} kB of page tables");
    }

    // Unloaded: the worst of a few sequential calls per transport.
    let mut baseline = Duration::ZERO;
    for varlink in [true, false] {
        for _ in 0..10 {
            baseline = baseline.max(check(&broker, varlink, bystander.pid));
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let loops: Vec<_> = [true, false]
        .iter()
        .zip(&counters)
        .map(|(&varlink, done)| {
            bystander_loop(
                Arc::clone(&broker),
                varlink,
                bystander.pid,
                Arc::clone(&stop),
                Arc::clone(done),
            )
        })
        .collect();
    wait_until("bystanders running", || {
        counters.iter().all(|c| c.load(Ordering::SeqCst) >= 3)
    });

    let kill_start = Instant::now();
    let kills: Vec<Child> = victims
        .0
        .iter()
        .map(|victim| {
            let mut kill = Command::new(bin("reapctl"));
            kill.args(["--varlink", "--socket"])
                .arg(reapd_e2e::varlink_socket(&broker))
                .args(["--timeout", "30", "kill", &victim.id().to_string()])
                .stdout(Stdio::null());
            spawn_as(Creds::uid(VICTIMS), &[], &mut kill)
        })
        .collect();
    for mut kill in kills {
        assert_eq!(kill.wait().unwrap().code(), Some(0), "kill failed");
    }
    let kill_end = Instant::now();
    for victim in &mut victims.0 {
        let _ = victim.wait();
    }

    let after: Vec<usize> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    wait_until("bystanders past the kill", || {
        counters
            .iter()
            .zip(&after)
            .all(|(c, a)| c.load(Ordering::SeqCst) >= a + 2)
    });
    stop.store(true, Ordering::SeqCst);
    let mut worst = Duration::ZERO;
    for (l, name) in loops.into_iter().zip(["varlink", "grpc"]) {
        let calls = l.join().unwrap();
        let during = calls
            .iter()
            .filter(|(t, d)| *t < kill_end && *t + *d > kill_start)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default();
        eprintln!("{name}: {} calls, worst overlapping the kill {during:?}", calls.len());
        worst = worst.max(during);
    }
    let log = broker.log_text();
    for victim in &victims.0 {
        let outcome = log
            .lines()
            .filter(|l| l.contains("event=\"outcome\"") && l.contains(&format!("target_pid={}", victim.id())))
            .collect::<Vec<_>>();
        assert_eq!(outcome.len(), 1, "one outcome record for {}\n{log}", victim.id());
        eprintln!("outcome: {}", outcome[0]);
    }
    eprintln!(
        "{count} kill(s) took {:?} (client wall); unloaded bystander worst {baseline:?}; worst during the kills {worst:?}",
        kill_end - kill_start
    );
    assert!(
        worst <= baseline + Duration::from_millis(100),
        "a bystander stalled {worst:?} (unloaded {baseline:?}) while {count} kill(s) of {:?} ran",
        kill_end - kill_start
    );
}

/// A flood of small kills, each from a varlink client that hangs up right
/// after sending it: they race each other for the reaper threads and
/// their connections' close. Every victim dies with exactly one decision
/// and one outcome record; and a last small kill, answered, proves the
/// broker still kills.
#[test]
fn a_flood_of_small_kills_whose_clients_hang_up_loses_no_record() {
    const FLOOD: usize = 24;
    let broker = start();
    let mut victims: Vec<Victim> = (0..FLOOD)
        .map(|_| Victim::spawn(Creds::uid(VICTIMS), 1 << 20))
        .collect();
    let socket = reapd_e2e::varlink_socket(&broker);
    let senders: Vec<_> = victims
        .iter()
        .map(|v| {
            let (socket, pid) = (socket.clone(), v.pid);
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(socket).unwrap();
                let call = format!(r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{pid}}}}}"#);
                stream.write_all(call.as_bytes()).unwrap();
                stream.write_all(&[0]).unwrap();
                // Dropped: the connection closes with the kill in flight.
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    for v in &mut victims {
        assert_eq!(v.wait(), Some(libc::SIGKILL), "victim {} not SIGKILLed", v.pid);
    }
    wait_until("an outcome record per victim", || {
        let log = broker.log_text();
        victims
            .iter()
            .all(|v| reapd_e2e::audit_records(&log, "outcome", v.pid) >= 1)
    });
    let log = broker.log_text();
    for v in &victims {
        assert_eq!(
            (
                reapd_e2e::audit_records(&log, "decision", v.pid),
                reapd_e2e::audit_records(&log, "outcome", v.pid)
            ),
            (1, 1),
            "pid {}\n{log}",
            v.pid
        );
    }
    let mut last = Victim::spawn(Creds::uid(VICTIMS), 1 << 20);
    let r = broker.reapctl(Creds::uid(VICTIMS), &["--timeout", "5", "kill", &last.pid.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(last.wait(), Some(libc::SIGKILL));
    let log = broker.log_text();
    assert_eq!(reapd_e2e::audit_records(&log, "outcome", last.pid), 1, "{log}");
}
