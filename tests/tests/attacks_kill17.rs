// SPDX-License-Identifier: MIT OR Apache-2.0
//! Attacks on the kill path of issue 17: KillAndReap runs its kill, reap,
//! wait, outcome record and event in one closure in place
//! (`block_in_place`), kills in flight are capped broker-wide (48), and the
//! broker gives free heap back when quiet. Each test is an attack a hostile
//! local user (uids 61700-61799) can mount; docs/threats.md ("Attacks
//! tried (issue 17 kill path)") has the table of what was tried and
//! measured.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reapd_client::varlink::Client;
use reapd_e2e::{bin, run_as, spawn_as, unsafe_kill, Broker, Creds, Freezer, Value, Victim};

const VICTIMS: u32 = 61701;
const BYSTANDER: u32 = 61702;
const GROUP: u32 = 61703;
const MIB: usize = 1 << 20;

/// No per-uid limit gets in the way: only what is under attack counts.
const OPEN_POLICY: &str =
    "[defaults]\nkill-rule = true\ncheck = \"anyone\"\n\n[limits]\nkills = 1000\nburst = 1000\nmax-in-flight = 100\n";

fn start(policy: &str) -> Broker {
    let file = reapd_e2e::policy_file(policy);
    let broker = Broker::start_with(&["--policy", file.path().to_str().unwrap()], &[]);
    reapd_e2e::wait_for_varlink(&broker);
    // The broker read the file at start; it stays for reloads only.
    std::mem::forget(file);
    broker
}

fn varlink(broker: &Broker) -> PathBuf {
    reapd_e2e::varlink_socket(broker)
}

fn in_flight(m: &[Value]) -> f64 {
    reapd_e2e::metric(m, "kills_in_flight", &[])
}

/// Sends a raw varlink KillAndReap and returns the open stream unread.
fn raw_kill(broker: &Broker, pid: i32, extra: &str) -> UnixStream {
    let mut stream = UnixStream::connect(varlink(broker)).unwrap();
    let call = format!(r#"{{"method":"io.reapd.Reaper.KillAndReap","parameters":{{"pid":{pid}{extra}}}}}"#);
    stream.write_all(call.as_bytes()).unwrap();
    stream.write_all(&[0]).unwrap();
    stream
}

/// Clients that go away at every point of a kill (varlink hang-up right
/// after the call and at later moments, a gRPC client killed, a gRPC
/// deadline that resets the stream) never leave a kill half done: every
/// victim the broker decided to kill has exactly one decision and one
/// outcome record, and every other victim is untouched.
#[test]
fn a_kill_whose_client_goes_away_at_any_point_has_one_decision_and_one_outcome() {
    const DELAYS_MS: [u64; 7] = [0, 1, 3, 10, 30, 100, 300];
    let broker = start(OPEN_POLICY);
    let victims: Vec<Victim> = (0..DELAYS_MS.len() * 3)
        .map(|_| Victim::spawn(Creds::uid(VICTIMS), MIB))
        .collect();
    let freezer = Freezer::new("reapd-kill17-hangup");
    for v in &victims {
        freezer.freeze(v.pid);
    }
    let mut chunks = victims.chunks(3);
    let mut deadline_clients = Vec::new();
    for delay in DELAYS_MS {
        let trio = chunks.next().unwrap();
        let delay = Duration::from_millis(delay);
        // varlink: the connection closes `delay` after the call was sent.
        let stream = raw_kill(&broker, trio[0].pid, r#","waitForExitMs":3000"#);
        // gRPC: the client process is killed `delay` after it started.
        let mut ctl = Command::new(bin("reapctl"));
        ctl.arg("--socket")
            .arg(&broker.grpc)
            .args(["kill", &trio[1].pid.to_string(), "--wait", "3000"]);
        ctl.stdout(Stdio::null()).stderr(Stdio::null());
        let mut killed = spawn_as(Creds::uid(VICTIMS), &[], &mut ctl);
        // gRPC: a 1 s deadline (grpc-timeout, then RST_STREAM) on a 3 s wait.
        let mut ctl = Command::new(bin("reapctl"));
        ctl.arg("--socket").arg(&broker.grpc).args([
            "--timeout",
            "1",
            "kill",
            &trio[2].pid.to_string(),
            "--wait",
            "3000",
        ]);
        ctl.stdout(Stdio::null()).stderr(Stdio::null());
        let timed_out = spawn_as(Creds::uid(VICTIMS), &[], &mut ctl);
        std::thread::sleep(delay);
        drop(stream);
        let _ = killed.kill();
        let _ = killed.wait();
        deadline_clients.push(timed_out);
    }
    // Every kill that started is still running (frozen victims, 3 s waits).
    // The deadline clients must have given up (their 1 s deadline passed,
    // RST_STREAM sent) before the victims are let go.
    for mut client in deadline_clients {
        let _ = client.wait();
    }
    freezer.thaw();
    reapd_e2e::wait_for_metrics(
        &broker,
        Creds::ROOT,
        "no kill in flight",
        Duration::from_secs(15),
        |m| in_flight(m) == 0.0,
    );
    let log = broker.log_text();
    let (mut killed, mut untouched) = (0, 0);
    for v in &victims {
        let (decisions, outcomes) = (
            reapd_e2e::audit_records(&log, "decision", v.pid),
            reapd_e2e::audit_records(&log, "outcome", v.pid),
        );
        assert!(
            decisions <= 1 && decisions == outcomes,
            "pid {}: {decisions} decisions, {outcomes} outcomes\n{log}",
            v.pid
        );
        if v.running() {
            assert_eq!(decisions, 0, "pid {} decided but alive", v.pid);
            untouched += 1;
        } else {
            killed += 1;
        }
    }
    eprintln!(
        "client gone mid-kill: {killed} killed with 1 decision + 1 outcome each, {untouched} never reached a decision"
    );
}

/// SIGTERM while kills are in their SIGTERM grace, reap delay and wait for
/// exit (each up to 10 s, so one kill may run ~30 s): shutdown drain waits
/// at most 12 s (SHUTDOWN_GRACE), so such kills were cut off by the exit
/// with a decision record and no outcome record. Shutdown must make them
/// finish and write their outcome records within the drain.
#[test]
fn sigterm_during_long_paced_kills_still_writes_every_outcome() {
    const KILLS: usize = 6;
    let mut broker = start(OPEN_POLICY);
    let victims: Vec<Victim> = (0..KILLS).map(|_| Victim::spawn(Creds::uid(VICTIMS), MIB)).collect();
    let freezer = Freezer::new("reapd-kill17-sigterm");
    for v in &victims {
        freezer.freeze(v.pid);
    }
    // Frozen victims ignore SIGTERM and do not exit on SIGKILL either:
    // each kill runs its whole grace, reap delay and wait.
    let streams: Vec<UnixStream> = victims
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let pacing = match i % 3 {
                0 => r#","graceMs":10000,"reapDelayMs":10000,"waitForExitMs":10000"#,
                1 => r#","graceMs":10000,"waitForExitMs":10000"#,
                _ => r#","waitForExitMs":10000"#,
            };
            raw_kill(&broker, v.pid, pacing)
        })
        .collect();
    assert!(reapd_e2e::wait_until(Duration::from_secs(5), || {
        let log = broker.log_text();
        victims
            .iter()
            .all(|v| reapd_e2e::audit_records(&log, "decision", v.pid) == 1)
    }));
    let t = Instant::now();
    unsafe_kill(broker.pid(), libc::SIGTERM);
    let status = loop {
        if let Ok(Some(status)) = broker.child.try_wait() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "broker still running 25 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stop = t.elapsed();
    drop(streams);
    let log = broker.log_text();
    let missing: Vec<i32> = victims
        .iter()
        .map(|v| v.pid)
        .filter(|pid| reapd_e2e::audit_records(&log, "outcome", *pid) != 1)
        .collect();
    eprintln!("SIGTERM with {KILLS} paced kills: exit {status:?} after {stop:?}; outcomes missing for {missing:?}");
    assert!(
        missing.is_empty(),
        "kills cut off by the stop without an outcome record: {missing:?}\n{log}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(stop < Duration::from_secs(13), "stop took {stop:?}");
    freezer.thaw();
}

/// More than the cap of stuck kills from several uids, each its own
/// victims; a group kill (KillCgroup) on top, refused at once on both
/// transports; then a ListCandidates flood (work on the blocking pool the
/// kills' hand-offs share, not capped by the kill cap): new connections of
/// a bystander uid are still identified and answered on both transports.
#[test]
fn stuck_kills_from_several_uids_over_the_cap_a_group_kill_and_a_listing_flood_stall_no_new_caller() {
    const UIDS: [u32; 4] = [61711, 61712, 61713, 61714];
    const PER_UID: usize = 13; // 52 kills: 4 over the cap of 48
    const CAP: f64 = 48.0;
    const FLOOD: usize = 32;
    let broker = start(
        "[defaults]\nkill-rule = true\ncheck = \"anyone\"\n\n[limits]\nkills = 1000\nburst = 1000\nmax-in-flight = 13\n",
    );
    let victims: Vec<(u32, Victim)> = UIDS
        .iter()
        .flat_map(|&uid| (0..PER_UID).map(move |_| (uid, Victim::spawn(Creds::uid(uid), MIB))))
        .collect();
    let bystander = Victim::spawn(Creds::uid(BYSTANDER), 0);
    let freezer = Freezer::new("reapd-kill17-cap");
    for (_, v) in &victims {
        freezer.freeze(v.pid);
    }
    let socket = varlink(&broker);
    let calls: Vec<_> = victims
        .iter()
        .map(|(uid, v)| {
            let mut ctl = Command::new(bin("reapctl"));
            ctl.args(["--varlink", "--socket"])
                .arg(&socket)
                .args(["kill", &v.pid.to_string(), "--wait", "10000"]);
            ctl.stdout(Stdio::null()).stderr(Stdio::piped());
            spawn_as(Creds::uid(*uid), &[], &mut ctl)
        })
        .collect();
    reapd_e2e::wait_for_metrics(
        &broker,
        Creds::ROOT,
        "the cap of kills in flight",
        Duration::from_secs(8),
        |m| in_flight(m) == CAP,
    );
    // A group kill is one more kill in flight: over the cap it is refused
    // at once, on both transports, and its member lives.
    let tree = reapd_e2e::CgroupTree::new(&reapd_e2e::top("kill17"));
    let group = reapd_e2e::TestCgroup::new(&format!("{}/g.scope", reapd_e2e::top("kill17")));
    let member = Victim::spawn(Creds::uid(GROUP), 0);
    group.add(member.pid);
    let path = format!("/{}/g.scope", reapd_e2e::top("kill17"));
    for transport in [&["--varlink", "--socket"][..], &["--socket"][..]] {
        let sock = if transport.len() == 2 { &socket } else { &broker.grpc };
        let mut command = Command::new(bin("reapctl"));
        command
            .args(transport)
            .arg(sock)
            .args(["--timeout", "5", "kill", "--cgroup", &path]);
        let out = run_as(Creds::uid(GROUP), &mut command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() != Some(0) && stderr.contains("all callers"),
            "{transport:?}: {:?} {stderr}",
            out.status
        );
    }
    assert!(member.running());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Flooders that have had at least one listing answered.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (socket, stop) = (socket.clone(), std::sync::Arc::clone(&stop));
            let flooding = std::sync::Arc::clone(&flooding);
            std::thread::spawn(move || {
                let mut client = Client::connect(socket).unwrap();
                let mut calls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client.list_candidates(reapd_client::CandidatesQuery {
                        limit: 1000,
                        ..Default::default()
                    });
                    calls += 1;
                    if calls == 1 {
                        flooding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                calls
            })
        })
        .collect();
    // The whole flood is running before the bystander's rounds start.
    assert!(
        reapd_e2e::wait_until(Duration::from_secs(20), || {
            flooding.load(std::sync::atomic::Ordering::SeqCst) == FLOOD
        }),
        "the flood never got going"
    );
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let t = Instant::now();
        let mut command = Command::new(bin("reapctl"));
        command
            .args(["--varlink", "--timeout", "5", "--socket"])
            .arg(&socket)
            .args(["check", &bystander.pid.to_string()]);
        let out = run_as(Creds::uid(BYSTANDER), &mut command);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = broker.reapctl(
            Creds::uid(BYSTANDER),
            &["--timeout", "5", "check", &bystander.pid.to_string()],
        );
        assert_eq!(r.code, 0, "round {round}: {r:?}");
        worst = worst.max(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let listed: u64 = flood.into_iter().map(|t| t.join().unwrap()).sum();
    let held = reapd_e2e::metrics_within(&broker, Creds::ROOT, Duration::from_secs(5)).expect("metrics answered");
    eprintln!(
        "{} stuck kills from {} uids + {FLOOD} listing connections ({listed} listings): worst check round on both transports {worst:?}",
        in_flight(&held),
        UIDS.len()
    );
    freezer.thaw();
    let mut refused = 0;
    for mut c in calls {
        let status = c.wait().unwrap();
        if status.code() != Some(0) {
            refused += 1;
        }
    }
    assert_eq!(
        refused,
        victims.len() - CAP as usize,
        "kills over the cap are refused, the rest succeed"
    );
    assert!(
        worst < Duration::from_secs(1),
        "a bystander's two checks took {worst:?}"
    );
    // The member first, then its cgroup, then the test's tree.
    drop(member);
    drop(group);
    drop(tree);
}

/// Kills stuck on frozen victims and a check multiplexed on one HTTP/2
/// connection: the kills block their threads in place, and the check on
/// another stream of the same connection is still answered at once (each
/// stream is its own task, so `block_in_place` holds only its own).
#[test]
fn stuck_kills_on_one_grpc_connection_do_not_stall_its_other_streams() {
    const STUCK: usize = 8;
    let broker = start(OPEN_POLICY);
    let victims: Vec<Victim> = (0..STUCK).map(|_| Victim::spawn(Creds::uid(VICTIMS), MIB)).collect();
    let bystander = Victim::spawn(Creds::uid(BYSTANDER), 0);
    let freezer = Freezer::new("reapd-kill17-h2");
    for v in &victims {
        freezer.freeze(v.pid);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime
        .block_on(reapd_client::Client::connect(&broker.grpc))
        .expect("gRPC connect");
    let kills: Vec<_> = victims
        .iter()
        .map(|v| {
            let mut client = client.clone();
            let pid = v.pid;
            runtime.spawn(async move {
                client
                    .kill_and_reap(reapd_client::Target::pid(pid), Some(Duration::from_secs(5)))
                    .await
            })
        })
        .collect();
    reapd_e2e::wait_for_metrics(&broker, Creds::ROOT, "the stuck kills", Duration::from_secs(5), |m| {
        in_flight(m) == STUCK as f64
    });
    let mut checker = client.clone();
    let t = Instant::now();
    let checked = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(3),
            checker.check_permission(reapd_client::Target::pid(bystander.pid)),
        )
        .await
    });
    let took = t.elapsed();
    eprintln!("check on the connection of {STUCK} stuck kills: {took:?}");
    assert!(matches!(checked, Ok(Ok(_))), "{checked:?} after {took:?}");
    assert!(took < Duration::from_secs(1), "check took {took:?}");
    freezer.thaw();
    for k in kills {
        let report = runtime.block_on(k).unwrap().expect("kill");
        assert!(report.exited, "{report:?}");
    }
}
