// SPDX-License-Identifier: MIT OR Apache-2.0
//! A reap that never ends (docs/threats.md): an unprivileged user makes its
//! own processes stall-prone (tests/src/bin/fuse_stall.rs: a FUSE READ never
//! answered while a reader holds the victim's mmap lock and a writer queues
//! behind it), so that `process_mrelease(2)` of the killed victim waits
//! forever. The low-memory killer (another uid, allowed by the policy) kills
//! them through the broker. Before the reaper threads (engine::reap_pool)
//! each such kill held its caller's answer, its per-uid in-flight slot (16)
//! and its outcome record forever: after 16 of them the killer's uid could
//! kill nothing more. Now the caller is answered "reap_pending" within the
//! bound, its slots are released, the outcome is recorded, stalled reaps
//! are capped (beyond: SIGKILL only, "reap skipped"), and shutdown does not
//! wait for them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reapd::engine::reap_pool::{MAX_RUNNING_NAMESPACED, MAX_RUNNING_PER_UID, REAP_ANSWER_AFTER};
use reapd_e2e::{bin, spawn_as, Broker, CgroupTree, Creds, CtlResult, TestCgroup, Victim};

/// The attacker: owns the stall-prone processes and the FUSE mount.
const ATTACKER: u32 = 61911;
/// The low-memory killer: another uid the policy lets kill both users.
const LMK: u32 = 61912;
/// An ordinary user whose processes the killer also kills.
const ORDINARY: u32 = 61913;
/// A bystander making its own calls meanwhile.
const BYSTANDER: u32 = 61914;
/// Colluding attackers (or one user's subordinate uids): each runs
/// stall-prone processes in a user namespace of its own.
const COLLUDERS: std::ops::Range<u32> = 61921..61926;

/// Default kill limits (16 in flight per uid): the point is that the
/// killer's slots come back, not that the test raised them.
fn policy() -> String {
    format!(
        "[defaults]\ncheck = \"anyone\"\n\n\
         [[rule]]\nname = \"lmk\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [{LMK}]\ntarget.uids = [{ATTACKER}, {ORDINARY}, {}]\n",
        COLLUDERS.map(|u| u.to_string()).collect::<Vec<_>>().join(", ")
    )
}

fn start() -> Broker {
    start_policy(&policy())
}

fn start_policy(text: &str) -> Broker {
    let file = reapd_e2e::policy_file(text);
    let broker = Broker::start_with(&["--policy", file.path().to_str().unwrap()], &[]);
    reapd_e2e::wait_for_varlink(&broker);
    std::mem::forget(file);
    broker
}

/// A broker whose policy also has the default's kill(2) rule (spelled
/// out): the attacker may kill its own processes through it.
fn start_with_kill_rule() -> Broker {
    start_policy(&policy().replace("[defaults]\n", "[defaults]\nkill-rule = true\n"))
}

/// The attacker's stall-prone processes (fuse-stall run as ATTACKER), torn
/// down on drop: the FUSE connection aborted (every wait ends, so nothing
/// stays stuck), then every process of it killed.
struct Stall {
    helper: Child,
    victims: Vec<i32>,
    others: Vec<i32>,
    conn: String,
    _dir: tempfile::TempDir,
}

impl Stall {
    /// `count` stall-prone victims, or `None` (a counted SKIP) when this
    /// machine lacks a precondition (unprivileged user namespaces, FUSE).
    fn start(test: &str, count: usize) -> Option<Stall> {
        Stall::start_as(test, ATTACKER, count)
    }

    /// As [`Stall::start`], the processes `uid`'s.
    fn start_as(test: &str, uid: u32, count: usize) -> Option<Stall> {
        let dir = tempfile::Builder::new().prefix("reaphold").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        // The FUSE device as distributions ship it (mode 0666: any user may
        // mount FUSE in a user namespace of its own); this machine's
        // /dev/fuse may be root's only, so a private node of it, the
        // attacker's, instead of changing the host's.
        let device = dir.path().join("fuse");
        let c_device = std::ffi::CString::new(device.to_str().unwrap()).unwrap();
        // SAFETY: mknod and chown of a path we just built.
        let made = unsafe {
            libc::mknod(c_device.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 229)) == 0
                && libc::chown(c_device.as_ptr(), uid, uid) == 0
        };
        if !made {
            reapd_e2e::skip(
                test,
                &format!("no FUSE device node: {}", std::io::Error::last_os_error()),
            );
            return None;
        }
        let mut command = Command::new(bin("fuse-stall"));
        command
            .arg(&device)
            .arg(&mnt)
            .arg(count.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut helper = spawn_as(Creds::uid(uid), &[], &mut command);
        let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
        let mut stall = Stall {
            helper,
            victims: Vec::new(),
            others: Vec::new(),
            conn: String::new(),
            _dir: dir,
        };
        loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("fuse-stall ended before it was ready");
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["SKIP:", ..] => {
                    reapd_e2e::skip(test, line.trim_start_matches("SKIP: "));
                    return None;
                }
                ["victim", v, "reader", r, "writer", w] => {
                    stall.victims.push(v.parse().unwrap());
                    stall.others.push(r.parse().unwrap());
                    stall.others.push(w.parse().unwrap());
                }
                ["server", s] => stall.others.push(s.parse().unwrap()),
                ["conn", n] => stall.conn = n.to_string(),
                ["ready"] => return Some(stall),
                _ => panic!("fuse-stall said {line:?}"),
            }
        }
    }

    /// Ends every wait: aborts the FUSE connection.
    fn abort(&self) {
        let _ = std::fs::write(format!("/sys/fs/fuse/connections/{}/abort", self.conn), "1");
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.abort();
        for pid in self.others.iter().chain(&self.victims) {
            reapd_e2e::unsafe_kill(*pid, libc::SIGKILL);
        }
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

/// A KillAndReap by the killer over varlink or gRPC; its result and wall
/// time.
fn kill(broker: &Broker, varlink: bool, pid: i32) -> (CtlResult, Duration) {
    let mut command = reapd_e2e::reapctl_over(broker, varlink);
    command.args(["--json", "--timeout", "30", "kill", &pid.to_string()]);
    let started = Instant::now();
    let out = reapd_e2e::run_as(Creds::uid(LMK), &mut command);
    (CtlResult::from(out), started.elapsed())
}

/// The process is past SIGKILL, in its exit (PF_EXITING in
/// /proc/PID/stat's flags), though it cannot finish it.
fn exiting(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let flags: u64 = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    flags & 0x4 != 0
}

/// A broker and one stall-prone victim (`None`: a counted SKIP).
fn one_stall_prone(test: &str) -> Option<(Broker, Stall, i32)> {
    let broker = start();
    let stall = Stall::start(test, 1)?;
    let pid = stall.victims[0];
    Some((broker, stall, pid))
}

/// Every stalled reap has ended (after the attacker let go), within 30 s.
fn no_reap_stalled(broker: &Broker) -> bool {
    reapd_e2e::wait_until(Duration::from_secs(30), || metric(broker, "reaps_stalled") == 0.0)
}

/// SIGTERM: the broker exits 0 within 3 s; its log.
fn stop_promptly(broker: &mut Broker, with: &str) -> String {
    let t = Instant::now();
    assert_eq!(broker.stop(), Some(0), "the broker did not stop\n{}", broker.log_text());
    let stopped = t.elapsed();
    eprintln!("stopped in {stopped:?} with {with}");
    assert!(stopped < Duration::from_secs(3), "stop took {stopped:?}");
    broker.log_text()
}

/// The attacker lets go: the stalled reap of `pid` ends, uncounted, with
/// its reap_ended record; then the broker stops.
fn let_go_and_see_it_end(broker: &mut Broker, stall: &Stall, pid: i32) {
    stall.abort();
    assert!(no_reap_stalled(broker), "reaps still stalled after the abort");
    let ended = reapd_e2e::wait_until(Duration::from_secs(10), || {
        records(&broker.log_text(), "reap_ended", pid).len() == 1
    });
    assert!(ended, "no reap_ended record for {pid}\n{}", broker.log_text());
    assert_eq!(broker.stop(), Some(0));
}

/// The audit lines of `event` naming `pid`.
fn records<'a>(log: &'a str, event: &str, pid: i32) -> Vec<&'a str> {
    let pid = format!("target_pid={pid}");
    let event = format!("event=\"{event}\"");
    log.lines()
        .filter(|l| l.contains(&event) && l.split_whitespace().any(|w| w == pid))
        .collect()
}

fn metric(broker: &Broker, name: &str) -> f64 {
    let metrics = reapd_e2e::metrics_within(broker, Creds::ROOT, Duration::from_secs(5)).expect("metrics answered");
    reapd_e2e::metric(&metrics, name, &[])
}

/// 18 stall-prone victims, more than the killer's 16 kills in flight: each
/// kill is answered within the bound (the first two "reap_pending", the
/// rest "reap skipped": killed only), with its outcome record, and leaves
/// no slot held; the killer then kills 17 ordinary processes, a bystander
/// is served throughout, and once the FUSE connection is aborted the two
/// stalled reaps end with their follow-up records.
#[test]
fn a_reap_that_never_ends_holds_no_caller_slot_or_record() {
    const TEST: &str = "attacks_reaphold::a_reap_that_never_ends_holds_no_caller_slot_or_record";
    let mut broker = start();
    let Some(stall) = Stall::start(TEST, 18) else {
        return;
    };
    let bound = REAP_ANSWER_AFTER + Duration::from_secs(2);
    let stalled = MAX_RUNNING_PER_UID as usize;
    for (i, &pid) in stall.victims.iter().enumerate() {
        let (r, took) = kill(&broker, i % 2 == 1, pid);
        eprintln!("kill {i} of stall-prone {pid}: {took:?} {}", r.json);
        assert_eq!(r.code, 0, "kill {i} of {pid}: {r:?}");
        assert!(took < bound, "kill {i} answered after {took:?} (bound {bound:?})");
        let reason = r.json["not_reaped_reason"].as_str().unwrap_or_default();
        if i < stalled {
            assert_eq!(r.json["outcome"], "reap_pending", "kill {i}: {r:?}");
            assert!(took >= REAP_ANSWER_AFTER, "pending before the bound: {took:?}");
        } else {
            assert_eq!(r.json["outcome"], "killed_not_reaped", "kill {i}: {r:?}");
            assert!(reason.contains("reap skipped"), "kill {i}: {reason}");
            assert!(took < REAP_ANSWER_AFTER, "a skipped reap waited {took:?}");
        }
        // The signal is sent; the victim acts on it when next scheduled.
        assert!(
            reapd_e2e::wait_until(Duration::from_secs(5), || exiting(pid)),
            "victim {pid} was not SIGKILLed"
        );
    }
    let log = broker.log_text();
    for (i, &pid) in stall.victims.iter().enumerate() {
        let outcome = records(&log, "outcome", pid);
        assert_eq!(outcome.len(), 1, "one outcome record for {pid}\n{log}");
        let want = if i < stalled {
            "outcome=\"reap_pending\""
        } else {
            "outcome=\"killed_not_reaped\""
        };
        assert!(outcome[0].contains(want), "{}", outcome[0]);
    }
    assert_eq!(metric(&broker, "kills_in_flight"), 0.0, "kills still hold their slots");
    assert_eq!(metric(&broker, "reaps_stalled"), stalled as f64);

    // The killer's slots came back: 17 more kills (one more than its 16 in
    // flight), reaped as usual; a bystander is served meanwhile.
    for i in 0..17 {
        let mut victim = Victim::spawn(Creds::uid(ORDINARY), 1 << 20);
        let (r, took) = kill(&broker, i % 2 == 0, victim.pid);
        assert_eq!(r.code, 0, "ordinary kill {i}: {r:?}");
        // Reaped, or already freeing its memory itself when the reap came.
        let outcome = r.json["outcome"].as_str().unwrap_or_default();
        assert!(
            ["reaped", "exited_before_reap"].contains(&outcome),
            "ordinary kill {i}: {r:?}"
        );
        assert!(took < Duration::from_secs(2), "ordinary kill {i} took {took:?}");
        assert_eq!(victim.wait(), Some(libc::SIGKILL));
    }
    let bystander = Victim::spawn(Creds::uid(BYSTANDER), 0);
    for varlink in [false, true] {
        let mut command = reapd_e2e::reapctl_over(&broker, varlink);
        command.args(["--timeout", "5", "check", &bystander.pid.to_string()]);
        let out = reapd_e2e::run_as(Creds::uid(BYSTANDER), &mut command);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }

    // The attacker lets go: the stalled reaps end, with their follow-up.
    stall.abort();
    let ended = reapd_e2e::wait_until(Duration::from_secs(30), || {
        let log = broker.log_text();
        stall.victims[..stalled]
            .iter()
            .all(|&pid| records(&log, "reap_ended", pid).len() == 1)
    });
    assert!(ended, "no reap_ended record\n{}", broker.log_text());
    assert_eq!(metric(&broker, "reaps_stalled"), 0.0);
    for line in stall.victims[..stalled].iter().flat_map(|&pid| {
        records(&broker.log_text(), "reap_ended", pid)
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    }) {
        eprintln!("follow-up: {line}");
    }
    let t = Instant::now();
    assert_eq!(broker.stop(), Some(0));
    eprintln!("stopped in {:?}", t.elapsed());
}

/// SIGTERM while a reap is stalled: the broker does not wait for it; it
/// stops promptly and records the reap as pending at shutdown.
#[test]
fn sigterm_with_a_reap_stalled_stops_promptly_and_records_it_pending() {
    const TEST: &str = "attacks_reaphold::sigterm_with_a_reap_stalled_stops_promptly_and_records_it_pending";
    let Some((mut broker, stall, pid)) = one_stall_prone(TEST) else {
        return;
    };
    let (r, took) = kill(&broker, true, pid);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json["outcome"], "reap_pending", "{r:?}");
    assert!(took < REAP_ANSWER_AFTER + Duration::from_secs(2), "{took:?}");
    let log = stop_promptly(&mut broker, "a reap stalled");
    let pending = records(&log, "reap_pending_at_shutdown", pid);
    assert_eq!(pending.len(), 1, "{log}");
    eprintln!("{}", pending[0]);
    drop(stall);
}

/// The same attack through a whole-cgroup kill (what reapd-lmk sends for a
/// cgroup): the group is answered within the bound, the stall-prone
/// member `reap_pending`, the other member reaped, no slot held; the
/// stalled reap counts until the attacker lets go.
#[test]
fn a_group_kill_with_a_reap_that_never_ends_is_answered_within_the_bound() {
    const TEST: &str = "attacks_reaphold::a_group_kill_with_a_reap_that_never_ends_is_answered_within_the_bound";
    let t = reapd_e2e::top("reaphold-group");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/stall.scope"));
    let broker = start();
    let Some(stall) = Stall::start(TEST, 1) else {
        return;
    };
    let stuck = stall.victims[0];
    let mut ordinary = Victim::spawn(Creds::uid(ATTACKER), 1 << 20);
    cg.add(stuck);
    cg.add(ordinary.pid);
    let started = Instant::now();
    let reply = reapd_e2e::varlink_call_as(
        Creds::uid(LMK),
        &reapd_e2e::varlink_socket(&broker),
        &format!(r#"{{"method":"io.reapd.Reaper.KillCgroup","parameters":{{"cgroup":"/{t}/stall.scope"}}}}"#),
        &[],
    );
    let took = started.elapsed();
    eprintln!("group kill answered in {took:?}: {reply}");
    assert!(took < REAP_ANSWER_AFTER + Duration::from_secs(2), "{took:?}");
    let members = reply["parameters"]["members"].as_array().expect("members").clone();
    let outcome_of = |pid: i32| {
        members
            .iter()
            .find(|m| m["process"]["pid"] == pid)
            .map(|m| m["outcome"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("member {pid} not in {reply}"))
    };
    assert_eq!(outcome_of(stuck), "reap_pending");
    assert!(["reaped", "exited_before_reap"].contains(&outcome_of(ordinary.pid).as_str()));
    assert_eq!(ordinary.wait(), Some(libc::SIGKILL));
    assert!(reapd_e2e::wait_until(Duration::from_secs(5), || exiting(stuck)));
    assert_eq!(metric(&broker, "kills_in_flight"), 0.0);
    assert_eq!(metric(&broker, "reaps_stalled"), 1.0);
    stall.abort();
    assert!(no_reap_stalled(&broker), "reaps still stalled after the abort");
    // A member's reap is followed up as a single kill's is.
    let ended = reapd_e2e::wait_until(Duration::from_secs(10), || {
        records(&broker.log_text(), "reap_ended", stuck).len() == 1
    });
    assert!(ended, "no reap_ended record for member {stuck}\n{}", broker.log_text());
}

/// One uid's burst. The default policy's kill(2) rule lets the attacker
/// kill its own processes through the broker; it sends 16 kills of its
/// stall-prone processes at once (its whole in-flight allowance). When
/// only reaps seen stalled were counted, all 16 were started before the
/// first was seen, pinning 16 reaper threads, and (counted broker-wide)
/// every other victim's reap was skipped. Reaps are counted when they
/// start: two of the uid's run (and stall), the other 14 wait for them and
/// are killed only when the bound passes; the low-memory killer's kill of
/// an innocent process, and its whole-cgroup kill, are reaped meanwhile.
#[test]
fn one_uids_burst_of_stall_prone_kills_pins_two_threads_and_skips_no_other_reap() {
    const TEST: &str = "attacks_reaphold::one_uids_burst_of_stall_prone_kills_pins_two_threads_and_skips_no_other_reap";
    const BURST: usize = 16;
    let t = reapd_e2e::top("reaphold-burst");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/innocent.scope"));
    let mut broker = start_with_kill_rule();
    let Some(stall) = Stall::start(TEST, BURST + 1) else {
        return;
    };
    let bystander = Victim::spawn(Creds::uid(BYSTANDER), 0);
    let unloaded = check_latency(&broker, bystander.pid);
    let answers = burst(&broker, &stall.victims[..BURST]);
    let pending = answers.iter().filter(|r| r.json["outcome"] == "reap_pending").count();
    let skipped = answers
        .iter()
        .filter(|r| {
            r.json["outcome"] == "killed_not_reaped"
                && r.json["not_reaped_reason"]
                    .as_str()
                    .is_some_and(|why| why.contains("reap skipped") && why.contains("per victim uid"))
        })
        .count();
    assert_eq!(pending, MAX_RUNNING_PER_UID as usize, "{answers:?}");
    assert_eq!(skipped, BURST - pending, "{answers:?}");
    assert_eq!(metric(&broker, "reaps_stalled"), f64::from(MAX_RUNNING_PER_UID));
    assert_eq!(metric(&broker, "reaps_waiting"), 0.0);
    let reapers = reaper_threads(&broker);
    eprintln!("after the burst: reapd-reap threads {reapers}");
    // The stalled ones and at most the two kept idle.
    assert!(reapers <= MAX_RUNNING_PER_UID as usize + 2, "{reapers} reaper threads");

    // Another uid's checks, both transports, with the reaps stalled: best
    // of 3 within 100 ms of the unloaded best (stalled threads sleep).
    let loaded = check_latency(&broker, bystander.pid);
    eprintln!("bystander check (gRPC, varlink): unloaded {unloaded:?}, with reaps stalled {loaded:?}");
    for (u, l) in unloaded.iter().zip(&loaded) {
        assert!(*l < *u + Duration::from_millis(100), "{loaded:?} vs {unloaded:?}");
    }

    // The attacker's next kill of its own is SIGKILL only, at once: every
    // reap holding its uid's limit is stalled.
    let mut command = reapd_e2e::reapctl_over(&broker, true);
    command.args(["--json", "--timeout", "30", "kill", &stall.victims[BURST].to_string()]);
    let asked = Instant::now();
    let r = CtlResult::from(reapd_e2e::run_as(Creds::uid(ATTACKER), &mut command));
    assert_eq!(r.json["outcome"], "killed_not_reaped", "{r:?}");
    assert!(
        asked.elapsed() < REAP_ANSWER_AFTER,
        "waited {:?} behind stalled reaps",
        asked.elapsed()
    );

    innocents_are_reaped(&broker, &t, &cg);

    // Once the attacker lets go, every stalled reap ends and is uncounted.
    stall.abort();
    assert!(no_reap_stalled(&broker), "reaps still stalled after the abort");
    // Its uid's limit lifted with them: its next kill is reaped again.
    let mut own = Victim::spawn(Creds::uid(ATTACKER), 1 << 20);
    let mut command = reapd_e2e::reapctl_over(&broker, false);
    command.args(["--json", "--timeout", "30", "kill", &own.pid.to_string()]);
    let r = CtlResult::from(reapd_e2e::run_as(Creds::uid(ATTACKER), &mut command));
    let outcome = r.json["outcome"].as_str().unwrap_or_default();
    assert!(["reaped", "exited_before_reap"].contains(&outcome), "{r:?}");
    assert_eq!(own.wait(), Some(libc::SIGKILL));
    assert_eq!(broker.stop(), Some(0));
}

/// The low-memory killer's kill of an innocent process (another uid, in
/// the broker's user namespace) is reaped, and so is its whole-cgroup kill
/// of `cg` (`{top}/innocent.scope`) with an innocent member.
fn innocents_are_reaped(broker: &Broker, top: &str, cg: &TestCgroup) {
    let mut victim = Victim::spawn(Creds::uid(ORDINARY), 1 << 20);
    let (r, took) = kill(broker, false, victim.pid);
    eprintln!("innocent kill: {took:?} {}", r.json);
    assert_eq!(r.code, 0, "{r:?}");
    let outcome = r.json["outcome"].as_str().unwrap_or_default();
    assert!(
        ["reaped", "exited_before_reap"].contains(&outcome),
        "stalled reaps skipped an innocent victim's reap: {r:?}"
    );
    assert!(took < Duration::from_secs(1), "the innocent kill waited {took:?}");
    assert_eq!(victim.wait(), Some(libc::SIGKILL));

    let mut member = Victim::spawn(Creds::uid(ORDINARY), 1 << 20);
    cg.add(member.pid);
    let reply = reapd_e2e::varlink_call_as(
        Creds::uid(LMK),
        &reapd_e2e::varlink_socket(broker),
        &format!(r#"{{"method":"io.reapd.Reaper.KillCgroup","parameters":{{"cgroup":"/{top}/innocent.scope"}}}}"#),
        &[],
    );
    eprintln!("innocent group kill: {reply}");
    let outcome = reply["parameters"]["members"][0]["outcome"]
        .as_str()
        .unwrap_or_default();
    assert!(
        ["reaped", "exited_before_reap"].contains(&outcome),
        "stalled reaps skipped an innocent group's reaps: {reply}"
    );
    assert_eq!(member.wait(), Some(libc::SIGKILL));
}

/// The broker's `reapd-reap` threads now.
fn reaper_threads(broker: &Broker) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", broker.pid()))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "reapd-reap"))
                .count()
        })
        .unwrap_or(0)
}

/// Colluding uids, or one user's subordinate uids: five uids, each with
/// stall-prone processes in a user namespace of its own, each killing two
/// of its own at once. Counted per uid only, that was 10 stalled reaps,
/// over the broker-wide cap of 8 that then skipped every other victim's
/// reap. Victims in user namespaces other than the broker's share one
/// budget (MAX_RUNNING_NAMESPACED): 8 run and stall, the other 2 are
/// killed only, and the killer's kills of processes in the broker's own
/// namespace are reaped as before.
#[test]
fn colluding_uids_in_user_namespaces_share_one_reap_budget() {
    const TEST: &str = "attacks_reaphold::colluding_uids_in_user_namespaces_share_one_reap_budget";
    let t = reapd_e2e::top("reaphold-collude");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/innocent.scope"));
    let mut broker = start_with_kill_rule();
    let mut stalls = Vec::new();
    for uid in COLLUDERS {
        let Some(stall) = Stall::start_as(TEST, uid, 2) else {
            return;
        };
        stalls.push((uid, stall));
    }
    let kills: Vec<(u32, i32)> = stalls
        .iter()
        .flat_map(|(uid, stall)| stall.victims.iter().map(move |&pid| (*uid, pid)))
        .collect();
    assert!(kills.len() > MAX_RUNNING_NAMESPACED as usize);
    let answers = burst_as(&broker, &kills);
    let pending = answers.iter().filter(|r| r.json["outcome"] == "reap_pending").count();
    let skipped: Vec<&CtlResult> = answers
        .iter()
        .filter(|r| r.json["outcome"] == "killed_not_reaped")
        .collect();
    assert_eq!(pending, MAX_RUNNING_NAMESPACED as usize, "{answers:?}");
    assert_eq!(skipped.len(), kills.len() - pending, "{answers:?}");
    for r in &skipped {
        let why = r.json["not_reaped_reason"].as_str().unwrap_or_default();
        assert!(why.contains("other user namespaces"), "{why}");
    }
    assert_eq!(metric(&broker, "reaps_stalled"), f64::from(MAX_RUNNING_NAMESPACED));
    let reapers = reaper_threads(&broker);
    assert!(
        reapers <= MAX_RUNNING_NAMESPACED as usize + 2,
        "{reapers} reaper threads"
    );

    innocents_are_reaped(&broker, &t, &cg);

    for (_, stall) in &stalls {
        stall.abort();
    }
    assert!(no_reap_stalled(&broker), "reaps still stalled after the abort");
    assert_eq!(broker.stop(), Some(0));
}

/// Honest kills of one uid's processes, many at once (an OOM manager
/// clearing a user's session): they wait for each other's reaps, two at a
/// time, and every one is reaped; none is skipped.
#[test]
fn a_burst_of_honest_kills_of_one_uid_reaps_every_one() {
    const BURST: usize = 12;
    let broker = start();
    let mut victims: Vec<Victim> = (0..BURST)
        .map(|_| Victim::spawn(Creds::uid(ORDINARY), 32 << 20))
        .collect();
    let started = Instant::now();
    let answers: Vec<CtlResult> = std::thread::scope(|s| {
        let kills: Vec<_> = victims
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (broker, pid) = (&broker, v.pid);
                s.spawn(move || kill(broker, i % 2 == 0, pid).0)
            })
            .collect();
        kills.into_iter().map(|k| k.join().unwrap()).collect()
    });
    eprintln!("{BURST} kills answered in {:?}", started.elapsed());
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.code, 0, "kill {i}: {r:?}");
        let outcome = r.json["outcome"].as_str().unwrap_or_default();
        assert!(["reaped", "exited_before_reap"].contains(&outcome), "kill {i}: {r:?}");
    }
    for v in &mut victims {
        assert_eq!(v.wait(), Some(libc::SIGKILL));
    }
    assert_eq!(metric(&broker, "reaps_running"), 0.0);
}

/// The attacker kills `victims` (its own) at once; the answers.
fn burst(broker: &Broker, victims: &[i32]) -> Vec<CtlResult> {
    let kills: Vec<(u32, i32)> = victims.iter().map(|&pid| (ATTACKER, pid)).collect();
    burst_as(broker, &kills)
}

/// Each `(uid, pid)`: uid kills pid (its own), all at once, each call on a
/// thread of its own, alternating transports: each answered within the
/// bound.
fn burst_as(broker: &Broker, kills: &[(u32, i32)]) -> Vec<CtlResult> {
    let started = Instant::now();
    let answers: Vec<(CtlResult, Duration)> = std::thread::scope(|s| {
        let kills: Vec<_> = kills
            .iter()
            .enumerate()
            .map(|(i, &(uid, pid))| {
                s.spawn(move || {
                    let mut command = reapd_e2e::reapctl_over(broker, i % 2 == 0);
                    command.args(["--json", "--timeout", "30", "kill", &pid.to_string()]);
                    let out = reapd_e2e::run_as(Creds::uid(uid), &mut command);
                    (CtlResult::from(out), started.elapsed())
                })
            })
            .collect();
        kills.into_iter().map(|k| k.join().unwrap()).collect()
    });
    for (i, (r, took)) in answers.iter().enumerate() {
        eprintln!("own kill {i}: {took:?} {}", r.json);
        assert_eq!(r.code, 0, "own kill {i}: {r:?}");
        assert!(*took < REAP_ANSWER_AFTER + Duration::from_secs(3), "{took:?}");
    }
    answers.into_iter().map(|(r, _)| r).collect()
}

/// The best of 3 CheckPermission calls by the bystander over gRPC and over
/// varlink (each a reapctl run).
fn check_latency(broker: &Broker, pid: i32) -> [Duration; 2] {
    [false, true].map(|varlink| {
        (0..3)
            .map(|_| {
                let mut command = reapd_e2e::reapctl_over(broker, varlink);
                command.args(["--timeout", "5", "check", &pid.to_string()]);
                let t = Instant::now();
                let out = reapd_e2e::run_as(Creds::uid(BYSTANDER), &mut command);
                assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
                t.elapsed()
            })
            .min()
            .unwrap()
    })
}

/// A kill with --grace, --reap-delay and --wait of a stall-prone process
/// (it never finishes its exit: its exit_mm waits on the same lock): its
/// reap goes through the reaper threads and their caps like any other, and
/// the caller is held only for what it asked for plus the answer bound.
#[test]
fn a_kill_with_grace_delay_and_wait_of_a_stall_prone_victim_is_bounded() {
    const TEST: &str = "attacks_reaphold::a_kill_with_grace_delay_and_wait_of_a_stall_prone_victim_is_bounded";
    let Some((mut broker, stall, pid)) = one_stall_prone(TEST) else {
        return;
    };
    let mut command = reapd_e2e::reapctl_over(&broker, true);
    command.args([
        "--json",
        "--timeout",
        "30",
        "kill",
        "--grace",
        "100",
        "--reap-delay",
        "100",
        "--wait",
        "1000",
    ]);
    command.arg(pid.to_string());
    let started = Instant::now();
    let r = CtlResult::from(reapd_e2e::run_as(Creds::uid(LMK), &mut command));
    let took = started.elapsed();
    eprintln!("kill with grace, reap delay and wait: {took:?} {}", r.json);
    assert!(
        took < Duration::from_millis(100 + 100 + 1000) + REAP_ANSWER_AFTER + Duration::from_secs(2),
        "{took:?}"
    );
    assert!(reapd_e2e::wait_until(Duration::from_secs(5), || exiting(pid)));
    assert_eq!(metric(&broker, "kills_in_flight"), 0.0);
    assert_eq!(metric(&broker, "reaps_stalled"), 1.0, "{r:?}");
    let log = broker.log_text();
    assert_eq!(records(&log, "outcome", pid).len(), 1, "{log}");
    let_go_and_see_it_end(&mut broker, &stall, pid);
}

/// SIGTERM after one uid's burst of 16 stall-prone kills: the broker
/// stops promptly and writes one reap_pending_at_shutdown record for each
/// reap answered pending, none for the kills whose reap never started.
#[test]
fn sigterm_after_a_burst_of_stall_prone_kills_stops_promptly_and_records_each_pending_reap() {
    const TEST: &str =
        "attacks_reaphold::sigterm_after_a_burst_of_stall_prone_kills_stops_promptly_and_records_each_pending_reap";
    const BURST: usize = 16;
    let mut broker = start_with_kill_rule();
    let Some(stall) = Stall::start(TEST, BURST) else {
        return;
    };
    let answers = burst(&broker, &stall.victims);
    assert_eq!(metric(&broker, "reaps_stalled"), f64::from(MAX_RUNNING_PER_UID));
    let log = stop_promptly(&mut broker, &format!("{MAX_RUNNING_PER_UID} reaps stalled"));
    for (&pid, answer) in stall.victims.iter().zip(&answers) {
        let want = usize::from(answer.json["outcome"] == "reap_pending");
        assert_eq!(
            records(&log, "reap_pending_at_shutdown", pid).len(),
            want,
            "{pid}\n{log}"
        );
    }
    drop(stall);
}

/// The caller hangs up right after its call (a raw varlink connection,
/// closed unanswered): the kill runs on to its answer regardless (a task
/// of its own), so the reap is still counted stalled, the outcome
/// recorded, the slot released; a caller cannot pin uncounted reaper
/// threads (beyond the caps) by hanging up before the answer bound.
#[test]
fn a_caller_hanging_up_before_the_bound_still_has_its_reap_counted() {
    const TEST: &str = "attacks_reaphold::a_caller_hanging_up_before_the_bound_still_has_its_reap_counted";
    let Some((mut broker, stall, pid)) = one_stall_prone(TEST) else {
        return;
    };
    {
        use std::io::Write;
        let mut conn = std::os::unix::net::UnixStream::connect(reapd_e2e::varlink_socket(&broker)).unwrap();
        conn.write_all(
            format!(r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{pid}}}}}"#).as_bytes(),
        )
        .unwrap();
        conn.write_all(b"\0").unwrap();
        // Hung up once the kill is under way: the victim acts on SIGKILL.
        assert!(reapd_e2e::wait_until(Duration::from_secs(5), || exiting(pid)));
    }
    assert!(reapd_e2e::wait_until(Duration::from_secs(10), || metric(
        &broker,
        "reaps_stalled"
    ) == 1.0));
    assert!(reapd_e2e::wait_until(Duration::from_secs(10), || records(
        &broker.log_text(),
        "outcome",
        pid
    )
    .len()
        == 1));
    assert_eq!(metric(&broker, "kills_in_flight"), 0.0);
    let_go_and_see_it_end(&mut broker, &stall, pid);
}
