// SPDX-License-Identifier: MIT OR Apache-2.0
//! End to end over varlink (`io.reapd.Reaper`): pidfd passing across pid
//! reuse, concurrency across connections, hostile input, fd hygiene, and
//! parity with gRPC on the same cases.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reapd_client::varlink::{pidfd_of, Client, Error};
use reapd_client::Target;
use reapd_e2e::{bin, fd_count, run_as, Broker, Creds, CtlResult, Value, Victim};
use serde_json::json;

const A: u32 = 61101;
const B: u32 = 61102;
const MIB: usize = 1 << 20;

/// Victims are forked without exec, so each inherits every fd the test
/// process has open at that moment, sockets to a broker included, and holds
/// them until killed. Tests that count the broker's fds or wait for it to see
/// a hang-up hold this lock, and every victim is forked under it.
static FORKS: Mutex<()> = Mutex::new(());

fn victim(creds: Creds, bytes: usize) -> Victim {
    let _no_fd_counting = FORKS.lock().unwrap_or_else(|p| p.into_inner());
    Victim::spawn(creds, bytes)
}

/// A broker whose varlink socket is up too (readiness is probed on gRPC).
fn start(args: &[&str]) -> Broker {
    let broker = Broker::start_with(args, &[]);
    reapd_e2e::wait_for_varlink(&broker);
    broker
}

fn socket(broker: &Broker) -> PathBuf {
    broker.dir.path().join("io.reapd.Reaper")
}

fn connect(broker: &Broker) -> Client {
    Client::connect(socket(broker)).expect("connect to the varlink socket")
}

/// `reapctl --varlink --json ARGS` as `creds`.
fn reapctl_varlink(broker: &Broker, creds: Creds, args: &[&str]) -> CtlResult {
    let mut command = Command::new(bin("reapctl"));
    command
        .arg("--varlink")
        .arg("--socket")
        .arg(socket(broker))
        .arg("--json")
        .args(args);
    CtlResult::from(run_as(creds, &mut command))
}

fn error_name(result: Result<impl std::fmt::Debug, Error>) -> (String, Value) {
    match result {
        Err(Error::Reply { name, parameters }) => (name, parameters),
        other => panic!("expected a varlink error, got {other:?}"),
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a live 2-int array; both fds are new and owned here.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS), bypassing the client.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[&OwnedFd]) {
    if let Err(err) = try_send_with_fds(stream, bytes, fds) {
        panic!("sendmsg: {err}");
    }
}

/// [`send_with_fds`], for a sender the broker may cut off.
fn try_send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[&OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: a plain sendmsg with a control buffer sized by CMSG_SPACE for
    // exactly `raw.len()` ints; every pointer is to live local data.
    unsafe {
        let mut control = vec![0u8; libc::CMSG_SPACE(payload) as usize];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len();
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg) as *mut i32, raw.len());
        }
        let sent = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if sent == bytes.len() as isize {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Reads one NUL-terminated reply.
fn read_reply(stream: &mut UnixStream) -> Option<Value> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == 0 => return serde_json::from_slice(&data).ok(),
            Ok(1) => data.push(byte[0]),
            _ => return None,
        }
    }
}

fn raw_call(stream: &mut UnixStream, message: &[u8]) -> Option<Value> {
    let mut bytes = message.to_vec();
    bytes.push(0);
    stream.write_all(&bytes).ok()?;
    read_reply(stream)
}

/// Bytes sent on `stream` that its peer has not read yet (SIOCOUTQ): 0
/// once the peer read them all or closed its end.
fn unread_by_peer(stream: &UnixStream) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to the live local.
    let ret = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    assert_eq!(ret, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    queued as usize
}

/// Waits (up to 5 s) for the broker's fd count to come back to `baseline`.
fn settles_to(broker: &Broker, baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = fd_count(broker.pid());
        if now <= baseline || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn passed_pidfd_of_an_exited_process_is_gone_even_when_its_pid_is_reused() {
    let broker = start(&[]);
    // Force the old pid onto a new process: write ns_last_pid before forking.
    // Other processes may fork in between, so try a few times.
    for _attempt in 0..50 {
        let mut old = victim(Creds::uid(A), 0);
        let old_pid = old.pid;
        let target = Target::pidfd_of(old_pid, Some(old.start_time())).expect("pidfd of a live victim");
        let second = target.clone();
        reapd_e2e::unsafe_kill(old_pid, libc::SIGKILL);
        old.wait();
        std::fs::write("/proc/sys/kernel/ns_last_pid", (old_pid - 1).to_string()).unwrap();
        let new = victim(Creds::uid(A), 0);
        if new.pid != old_pid {
            continue;
        }
        let mut client = connect(&broker);
        let (name, params) = error_name(client.kill_and_reap(target, None));
        assert_eq!(name, "io.reapd.Reaper.NoSuchProcess", "{params}");
        let (name, _) = error_name(client.check_permission(second));
        assert_eq!(name, "io.reapd.Reaper.NoSuchProcess");
        assert!(new.running(), "the new process at the reused pid was hit");
        // The pid names a live process, which a by-pid call would reach.
        let check = client.check_permission(Target::pid(old_pid)).unwrap();
        assert_eq!(check.target.start_time, new.start_time());
        return;
    }
    panic!("could not get a pid reused in 50 attempts");
}

#[test]
fn reapctl_pidfd_of_kills_exactly_the_pinned_process() {
    let broker = start(&[]);
    let mut victim = victim(Creds::uid(A), 16 * MIB);
    let pid = victim.pid.to_string();

    // A stale start time is caught on the client side, before any call.
    let r = reapctl_varlink(
        &broker,
        Creds::uid(A),
        &["kill", "--pidfd-of", &pid, "--start-time", "1"],
    );
    assert_eq!(r.code, 7, "{r:?}");
    assert!(victim.running());

    // Another uid may open the pidfd, but the broker's policy still decides.
    let r = reapctl_varlink(&broker, Creds::uid(B), &["kill", "--pidfd-of", &pid]);
    assert_eq!(r.code, 6, "{r:?}");
    assert_eq!(r.json["error"], "permission_denied");
    assert!(victim.running());

    let start = victim.start_time().to_string();
    let r = reapctl_varlink(
        &broker,
        Creds::uid(A),
        &["kill", "--pidfd-of", &pid, "--start-time", &start, "--wait", "5000"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json["target"]["pid"], victim.pid);
    assert_eq!(r.json["exited"], true);
    assert!(["reaped", "exited_before_reap"].contains(&r.json["outcome"].as_str().unwrap()));
    assert_eq!(victim.wait(), Some(libc::SIGKILL));
}

#[test]
fn a_passed_fd_that_is_not_a_pidfd_is_an_invalid_parameter() {
    let broker = start(&[]);
    let (read, _write) = pipe();
    let mut client = connect(&broker);
    let result = client.call("io.reapd.Reaper.KillAndReap", json!({ "pidfd": 0 }), &[&read]);
    let (name, params) = error_name(result);
    assert_eq!(name, "org.varlink.service.InvalidParameter");
    assert_eq!(params, json!({ "parameter": "pidfd" }));
    // An index past the fds passed.
    let result = client.call("io.reapd.Reaper.CheckPermission", json!({ "pidfd": 1 }), &[&read]);
    assert_eq!(error_name(result).1, json!({ "parameter": "pidfd" }));
    // A pidfd plus a start time is two names for one target.
    let victim = victim(Creds::uid(A), 0);
    let pidfd = pidfd_of(victim.pid, None).unwrap();
    let result = client.call(
        "io.reapd.Reaper.CheckPermission",
        json!({ "pidfd": 0, "startTime": 1 }),
        &[&pidfd],
    );
    assert_eq!(error_name(result).1, json!({ "parameter": "startTime" }));
    assert!(victim.running());
}

/// A KillAndReap running on its own thread.
type KillCall = std::thread::JoinHandle<Result<reapd_client::KillReport, Error>>;

/// `n` victims of uid A holding `bytes`, frozen (v1 freezer: a killed
/// victim cannot exit), and a KillAndReap of each waiting up to `wait` for
/// the exit, one connection and thread each: each call stays in flight
/// until the test thaws the freezer.
fn kills_on_frozen_victims(
    broker: &Broker,
    freezer: &str,
    n: usize,
    bytes: usize,
    wait: Duration,
) -> (Vec<Victim>, reapd_e2e::Freezer, Vec<KillCall>) {
    let victims: Vec<Victim> = (0..n).map(|_| victim(Creds::uid(A), bytes)).collect();
    let freezer = reapd_e2e::Freezer::new(freezer);
    for v in &victims {
        freezer.freeze(v.pid);
    }
    let calls = victims
        .iter()
        .map(|v| {
            let (pid, path) = (v.pid, socket(broker));
            std::thread::spawn(move || {
                Client::connect(path)
                    .unwrap()
                    .kill_and_reap(Target::pid(pid), Some(wait))
            })
        })
        .collect();
    (victims, freezer, calls)
}

#[test]
fn a_check_on_an_eleventh_connection_is_not_delayed_by_ten_slow_reaps() {
    let broker = start(&[]);
    const SLOW: usize = 10;
    const WAIT: Duration = Duration::from_secs(10);
    let bystander = victim(Creds::uid(A), 0);
    let (victims, freezer, slow) = kills_on_frozen_victims(&broker, "reapd-varlink-slow", SLOW, 64 * MIB, WAIT);
    // All ten in flight at once, as the broker counts them. Each metrics
    // read is a call on another connection: a server that serves one
    // connection (or one call) at a time answers none of them while the
    // first kill waits, and this fails rather than hangs.
    let in_flight = |m: &[Value]| reapd_e2e::metric(m, "kills_in_flight", &[]);
    reapd_e2e::wait_for_metrics(&broker, Creds::ROOT, "10 kills in flight", WAIT / 2, |m| {
        in_flight(m) == SLOW as f64
    });
    // The check on an eleventh connection is answered while they all are.
    let mut checker = connect(&broker);
    let permission = checker.check_permission(Target::pid(bystander.pid)).unwrap();
    assert!(permission.allowed);
    let after = reapd_e2e::metrics_within(&broker, Creds::ROOT, WAIT / 2).expect("metrics answered");
    assert_eq!(
        in_flight(&after),
        SLOW as f64,
        "a slow call ended before the check was answered"
    );
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "a slow call returned before the thaw"
    );

    freezer.thaw();
    for t in slow {
        let report = t.join().unwrap().expect("slow kill");
        assert!(report.memory_before.anon_bytes >= 64 * MIB as u64, "{report:?}");
        assert!(report.exited, "{report:?}");
    }
    drop(victims);
}

#[test]
fn hostile_messages_get_error_replies_and_leak_nothing() {
    let _no_forks = FORKS.lock().unwrap_or_else(|p| p.into_inner());
    let mut broker = start(&[]);
    // Warm up (lazy runtime threads, first connection) before the baseline,
    // taken once the broker has closed the warm-up connection: its fds gone.
    let mut warm = connect(&broker);
    warm.capabilities().unwrap();
    let with_warm = fd_count(broker.pid());
    drop(warm);
    assert!(
        reapd_e2e::wait_until(Duration::from_secs(5), || fd_count(broker.pid()) < with_warm),
        "the broker kept the warm-up connection's fds: {:?}",
        fd_links(broker.pid())
    );
    let baseline = fd_count(broker.pid());

    let mut stream = UnixStream::connect(socket(&broker)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cases: &[(&[u8], &str, Value)] = &[
        (b"{not json", "io.reapd.Reaper.InvalidMessage", Value::Null),
        (b"[1,2]", "io.reapd.Reaper.InvalidMessage", Value::Null),
        (b"{\"parameters\":{}}", "io.reapd.Reaper.InvalidMessage", Value::Null),
        (b"\xff\xfe", "io.reapd.Reaper.InvalidMessage", Value::Null),
        (
            br#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":"1"}}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "pid"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":1.5}}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "pid"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":-1}}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "pid"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":4294967297}}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "pid"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":1,"waitForExitMs":-5}}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "waitForExitMs"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.CheckPermission","parameters":{"pid":1,"start_time":5}}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "start_time"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.CheckPermission","parameters":"x"}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "parameters"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.CheckPermission","parameters":{"pid":1},"more":1}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "more"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.KillAndReap","parameters":{"pid":1},"upgrade":true}"#,
            "org.varlink.service.InvalidParameter",
            json!({"parameter": "upgrade"}),
        ),
        (
            br#"{"method":"io.reapd.Reaper.Explode"}"#,
            "org.varlink.service.MethodNotFound",
            json!({"method": "io.reapd.Reaper.Explode"}),
        ),
        (
            br#"{"method":"NoDots"}"#,
            "org.varlink.service.InterfaceNotFound",
            json!({"interface": "NoDots"}),
        ),
        (
            br#"{"method":"org.example.Thing.Do"}"#,
            "org.varlink.service.InterfaceNotFound",
            json!({"interface": "org.example.Thing"}),
        ),
    ];
    for (message, name, params) in cases {
        let reply = raw_call(&mut stream, message).unwrap_or_else(|| {
            panic!(
                "no reply to {}: log\n{}",
                String::from_utf8_lossy(message),
                broker.log_text()
            )
        });
        assert_eq!(reply["error"], *name, "{}", String::from_utf8_lossy(message));
        if !params.is_null() {
            assert_eq!(reply["parameters"], *params);
        }
    }
    // The connection survived all of that.
    let reply = raw_call(&mut stream, br#"{"method":"io.reapd.Reaper.GetCapabilities"}"#).unwrap();
    assert!(reply["parameters"]["brokerVersion"].is_string(), "{reply}");
    drop(stream);

    // Fds passed where none are expected are closed: the broker's copy of a
    // pipe's write end is gone once our read end sees EOF.
    for message in [
        &br#"{"method":"io.reapd.Reaper.GetCapabilities"}"#[..],
        br#"{"method":"io.reapd.Reaper.CheckPermission","parameters":{"pid":1}}"#,
        br#"{"method":"org.varlink.service.GetInfo","oneway":true}"#,
        b"{garbage",
        br#"{"method":"io.reapd.Reaper.Explode"}"#,
    ] {
        for _ in 0..10 {
            let (mut read, write) = {
                let (r, w) = pipe();
                (std::fs::File::from(r), w)
            };
            let (extra_r, extra_w) = pipe();
            let mut stream = UnixStream::connect(socket(&broker)).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut bytes = message.to_vec();
            bytes.push(0);
            send_with_fds(&stream, &bytes, &[&write, &extra_r, &extra_w]);
            if !message.windows(6).any(|w| w == b"oneway") {
                assert!(read_reply(&mut stream).is_some());
            }
            drop((write, extra_r, extra_w, stream));
            let mut buf = [0u8; 1];
            // Blocks until every copy of the write end is closed.
            assert_eq!(read.read(&mut buf).unwrap(), 0);
        }
    }

    // An unterminated message, then hang up.
    let mut stream = UnixStream::connect(socket(&broker)).unwrap();
    stream.write_all(br#"{"method":"io.reapd.Reaper.GetCap"#).unwrap();
    drop(stream);

    // A 16 MiB message: an error reply, then the connection is closed.
    let mut stream = UnixStream::connect(socket(&broker)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b' '; MIB];
            let mut written = 0;
            for _ in 0..16 {
                match stream.write_all(&chunk) {
                    Ok(()) => written += chunk.len(),
                    Err(_) => break,
                }
            }
            written
        })
    };
    let reply = read_reply(&mut stream).expect("a reply to an oversized message");
    assert_eq!(reply["error"], "io.reapd.Reaper.InvalidMessage");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let written = writer.join().unwrap();
    assert!(written < 16 * MIB, "the broker read all 16 MiB");
    drop(stream);

    // 50 connections at once, each sent half a message with a pipe fd.
    let held: Vec<UnixStream> = (0..50)
        .map(|_| {
            let s = UnixStream::connect(socket(&broker)).unwrap();
            let (r, _w) = pipe();
            send_with_fds(&s, b"{\"method\":", &[&r]);
            s
        })
        .collect();
    // The broker installs a message's fds only when it reads the whole
    // message: an incomplete one's stay in the socket, not in the broker,
    // which holds two per connection (the socket, the caller's pidfd).
    // Once it holds all 50 sockets (each has been accepted), a count that
    // stays under the bound while it serves them for a while: a bound that
    // must hold, so sampled over a window rather than waited for.
    assert!(
        reapd_e2e::wait_until(Duration::from_secs(5), || fd_count(broker.pid()) >= baseline + 50),
        "the broker did not accept the 50 connections: {} fds (baseline {baseline})",
        fd_count(broker.pid())
    );
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(300) {
        let open = fd_count(broker.pid());
        assert!(
            open < baseline + 2 * 50 + 25,
            "{open} fds for 50 half-sent messages (baseline {baseline}): their fds were installed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(held);

    // A message dribbled out a byte per write, each write with fds: the
    // broker keeps only a few pending, whatever the client sends (once the
    // sender's fds waiting to be closed are over its budget, the broker
    // hangs up on it).
    let dribble = UnixStream::connect(socket(&broker)).unwrap();
    let (r, w) = pipe();
    for _ in 0..300 {
        if try_send_with_fds(&dribble, b" ", &[&r, &w, &r]).is_err() {
            break;
        }
    }
    // Until the broker has dealt with every byte sent (read it, or hung up
    // and dropped the rest): nothing is left in its queue.
    assert!(
        reapd_e2e::wait_until(Duration::from_secs(5), || unread_by_peer(&dribble) == 0),
        "the broker left {} bytes of the dribble unread",
        unread_by_peer(&dribble)
    );
    // The refused fds go to the closer thread, which closes them off the
    // executor: wait for it (observable state), then the bound must hold.
    let settled = reapd_e2e::wait_until(Duration::from_secs(5), || fd_count(broker.pid()) < baseline + 20);
    let during = fd_count(broker.pid());
    assert!(
        settled && during < baseline + 20,
        "{during} fds held for one dribbling connection (baseline {baseline})"
    );
    drop(dribble);

    assert!(broker.alive());
    let after = settles_to(&broker, baseline);
    assert!(
        after <= baseline,
        "broker fds: {baseline} before, {after} after: {:?}",
        fd_links(broker.pid())
    );
    connect(&broker).capabilities().unwrap();
}

/// The decision-relevant part of a reapctl --json result.
fn summary(r: &CtlResult) -> Value {
    json!({
        "code": r.code,
        "error": r.json.get("error"),
        "allowed": r.json.get("allowed"),
        "reason": r.json.get("reason"),
        "rule": r.json.get("rule"),
        "target_uid": r.json.pointer("/target/uid"),
        "killed": r.json.get("outcome").map(|o| o == "reaped" || o == "exited_before_reap"),
    })
}

#[test]
fn grpc_and_varlink_agree_on_every_case() {
    let broker = start(&[]);
    let me = std::process::id().to_string();
    // (caller, victim creds, or a fixed pid argument, extra args)
    enum Who {
        Victim(Creds),
        Pid(&'static str),
        Broker,
        Me,
    }
    let cases: &[(&str, Creds, Who, &[&str])] = &[
        ("root on a user", Creds::ROOT, Who::Victim(Creds::uid(A)), &[]),
        ("same uid", Creds::uid(A), Who::Victim(Creds::uid(A)), &[]),
        ("other uid", Creds::uid(B), Who::Victim(Creds::uid(A)), &[]),
        ("user on root", Creds::uid(A), Who::Victim(Creds::ROOT), &[]),
        (
            "ruid match",
            Creds::uids(A, B, B),
            Who::Victim(Creds::uids(B, A, B)),
            &[],
        ),
        (
            "stale start",
            Creds::uid(A),
            Who::Victim(Creds::uid(A)),
            &["--start-time", "1"],
        ),
        ("no such pid", Creds::uid(A), Who::Pid("4194303"), &[]),
        ("pid zero", Creds::uid(A), Who::Pid("0"), &[]),
        ("init", Creds::ROOT, Who::Pid("1"), &[]),
        ("the broker", Creds::ROOT, Who::Broker, &[]),
        ("the test itself", Creds::ROOT, Who::Me, &[]),
    ];
    let mut table = Vec::new();
    for (label, caller, who, extra) in cases {
        for command in ["check", "kill"] {
            let mut outcomes = Vec::new();
            for transport in ["grpc", "varlink"] {
                let victim = match who {
                    Who::Victim(creds) => Some(victim(*creds, 8 * MIB)),
                    _ => None,
                };
                let pid = match (who, &victim) {
                    (_, Some(v)) => v.pid.to_string(),
                    (Who::Pid(p), _) => p.to_string(),
                    (Who::Broker, _) => broker.pid().to_string(),
                    _ => me.clone(),
                };
                let mut args = vec![command, pid.as_str()];
                args.extend_from_slice(extra);
                if command == "kill" {
                    args.extend_from_slice(&["--wait", "5000"]);
                }
                if command == "kill" && matches!(who, Who::Me | Who::Broker | Who::Pid("1")) {
                    // Never actually kill these; the check already said.
                    continue;
                }
                let r = match transport {
                    "grpc" => broker.reapctl(*caller, &args),
                    _ => reapctl_varlink(&broker, *caller, &args),
                };
                let mut s = summary(&r);
                if let Some(v) = &victim {
                    s["victim_alive"] = json!(v.running() && !matches!(r.json.get("exited"), Some(Value::Bool(true))));
                }
                outcomes.push(s);
            }
            if outcomes.len() == 2 {
                assert_eq!(outcomes[0], outcomes[1], "{label} / {command}: gRPC vs varlink differ");
                table.push(format!("{label:>16} {command:>5}: {}", outcomes[0]));
            }
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(table.len() >= 16);
}

#[test]
fn check_permission_latency_over_varlink_and_grpc() {
    let broker = start(&[]);
    let victim = victim(Creds::uid(A), 0);
    const N: usize = 300;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };

    let mut client = connect(&broker);
    let target = || Target::pid(victim.pid);
    let mut varlink = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        client.check_permission(target()).unwrap();
        varlink.push(t.elapsed());
    }

    let mut grpc_client = reapd_client::blocking::Client::connect(&broker.grpc).unwrap();
    let mut grpc = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        grpc_client.check_permission(Target::pid(victim.pid)).unwrap();
        grpc.push(t.elapsed());
    }

    // The engine's own time per check, from the audit records.
    let in_process: Vec<Duration> = broker
        .log_text()
        .lines()
        .filter(|l| l.contains("action=\"check\"") || l.contains("action=check"))
        .filter_map(|l| l.split("elapsed_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .map(Duration::from_micros)
        .collect();
    let (v, g) = (median(varlink), median(grpc));
    let engine = (!in_process.is_empty()).then(|| median(in_process));
    eprintln!("CheckPermission median over {N} calls: varlink {v:?}, gRPC {g:?}, engine alone {engine:?}");
    assert!(v < Duration::from_millis(50) && g < Duration::from_millis(50));
}

#[test]
fn varlink_shares_the_connection_caps_and_idle_timeout_with_grpc() {
    let _no_forks = FORKS.lock().unwrap_or_else(|p| p.into_inner());
    const IDLE: Duration = Duration::from_secs(3);
    // Uid B reads the metrics (a watch grant): its connection is not root's,
    // so it takes none of the four slots this test fills.
    let policy = reapd_e2e::policy_file(&reapd_e2e::watch_rule(B));
    let mut broker = start(&[
        "--policy",
        policy.path().to_str().unwrap(),
        "--max-connections-per-uid",
        "4",
        "--idle-timeout-secs",
        &IDLE.as_secs().to_string(),
    ]);
    let open_now = |m: &[Value]| reapd_e2e::metric(m, "connections_open", &[]);
    let open_is = |n: f64, what: &str| {
        reapd_e2e::wait_for_metrics(&broker, Creds::uid(B), what, Duration::from_secs(10), |m| {
            open_now(m) == n
        })
    };
    // The readiness probes' connections are uncounted: only the reader's.
    open_is(1.0, "the probes' slots");
    // The instant is taken before connect(): the broker may accept (and
    // start the idle timer) before connect() has returned here.
    let open = |path: &PathBuf| {
        let connected = Instant::now();
        (UnixStream::connect(path).unwrap(), connected)
    };
    // Two gRPC and two varlink connections fill this uid's four slots.
    let mut held = vec![
        open(&broker.grpc),
        open(&broker.grpc),
        open(&socket(&broker)),
        open(&socket(&broker)),
    ];
    open_is(5.0, "the four held connections counted");
    let (mut fifth, connected) = open(&socket(&broker));
    match reapd_e2e::how_closed(&mut fifth, connected, Duration::from_secs(1)) {
        reapd_e2e::Closed::Eof { bytes: 0, .. } => {}
        other => panic!("the over-cap connection was not closed at once: {other:?}"),
    }
    assert!(
        reapd_e2e::wait_until(Duration::from_secs(5), || {
            reapd_e2e::count_lines(
                &broker.log_text(),
                &["connection refused: over the per-uid connection limit", "caller_uid=0"],
            ) == 1
        }),
        "the per-uid cap is not what closed it: {}",
        broker.log_text()
    );

    // All four, varlink and gRPC, are closed by the idle timer: not before
    // IDLE after their connect (it starts at accept), and not much later.
    for (i, (stream, connected)) in held.iter_mut().enumerate() {
        match reapd_e2e::how_closed(stream, *connected, IDLE + Duration::from_secs(5)) {
            reapd_e2e::Closed::Eof { after, .. } => {
                assert!(
                    after >= IDLE,
                    "connection {i} closed after {after:?}, before its idle timeout"
                )
            }
            reapd_e2e::Closed::Open(err) => panic!("connection {i} was not closed by its idle timer: {err}"),
        }
    }
    drop(held);
    open_is(1.0, "the held connections' slots");
    connect(&broker).capabilities().expect("a slot is free again");

    // SIGTERM with a varlink connection open: a clean, prompt exit.
    let _open = connect(&broker);
    let t = Instant::now();
    assert_eq!(broker.stop(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn one_rate_limit_spans_both_transports() {
    let policy = tempfile_policy("[limits]\nkills = 1\ninterval-secs = 10.0\nburst = 2\n");
    let broker = start(&["--policy", policy.to_str().unwrap()]);
    let victims: Vec<Victim> = (0..4).map(|_| victim(Creds::uid(A), 0)).collect();
    let pid = |i: usize| victims[i].pid.to_string();
    // One kill over each transport uses up the burst of 2 ...
    assert_eq!(broker.reapctl(Creds::uid(A), &["kill", &pid(0)]).code, 0);
    assert_eq!(reapctl_varlink(&broker, Creds::uid(A), &["kill", &pid(1)]).code, 0);
    // ... so both now refuse this uid.
    let r = reapctl_varlink(&broker, Creds::uid(A), &["kill", &pid(2)]);
    assert_eq!(r.code, 8, "{r:?}");
    assert_eq!(r.json["error"], "rate_limited");
    let r = broker.reapctl(Creds::uid(A), &["kill", &pid(2)]);
    assert_eq!(r.code, 8, "{r:?}");
    assert_eq!(r.json["error"], "rate_limited");
    // Another uid has its own bucket.
    let mut client = connect(&broker);
    client
        .kill_and_reap(Target::pid(victims[3].pid), None)
        .expect("root is not limited by uid A's kills");
    assert!(victims[2].running());
    std::fs::remove_file(policy).ok();
}

fn tempfile_policy(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("reapd-varlink-policy-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn fd_links(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills that hold their threads (frozen victims, a long wait for exit) are
/// capped broker-wide: past the cap a kill is refused as rate-limited at
/// once, and while the capped ones hang another uid's check on a new
/// connection is answered on both transports. Without the cap, kills in
/// place would take the blocking pool's last threads, and with them the
/// workers' hand-off and caller identification at accept: every caller
/// would stall.
#[test]
fn kills_stuck_on_frozen_victims_are_capped_and_never_stall_other_callers() {
    const CAP: usize = 48; // reapd::engine::limits::MAX_KILLS_IN_FLIGHT
    const OVER: usize = 2;
    const WAIT: Duration = Duration::from_secs(10);
    // The per-uid limits out of the way: only the broker-wide cap is tested.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[defaults]\nkill-rule = true\ncheck = \"anyone\"\n\n[limits]\nkills = 1000\nburst = 1000\nmax-in-flight = 100\n",
    )
    .unwrap();
    let broker = start(&["--policy", policy.to_str().unwrap()]);
    let bystander = victim(Creds::uid(B), 0);
    let (victims, freezer, calls) = kills_on_frozen_victims(&broker, "reapd-varlink-stuck", CAP + OVER, MIB, WAIT);
    let in_flight = |m: &[Value]| reapd_e2e::metric(m, "kills_in_flight", &[]);
    reapd_e2e::wait_for_metrics(&broker, Creds::ROOT, "the cap of kills in flight", WAIT / 2, |m| {
        in_flight(m) == CAP as f64
    });
    // The ones over the cap are answered at once, refused.
    assert!(
        reapd_e2e::wait_until(WAIT / 2, || calls.iter().filter(|t| t.is_finished()).count() == OVER),
        "{} calls returned while {CAP} kills hang",
        calls.iter().filter(|t| t.is_finished()).count()
    );
    // Another uid, new connections, both transports: answered while the
    // capped kills all still hang.
    let mut command = Command::new(bin("reapctl"));
    command
        .args(["--varlink", "--socket"])
        .arg(socket(&broker))
        .args(["check", &bystander.pid.to_string()]);
    let out = run_as(Creds::uid(B), &mut command);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let r = broker.reapctl(Creds::uid(B), &["check", &bystander.pid.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    let after = reapd_e2e::metrics_within(&broker, Creds::ROOT, WAIT / 2).expect("metrics answered");
    assert_eq!(
        in_flight(&after),
        CAP as f64,
        "a capped kill ended before the checks were answered"
    );

    freezer.thaw();
    let (mut reaped, mut refused) = (0, 0);
    for t in calls {
        match t.join().unwrap() {
            Ok(report) => {
                assert!(report.exited, "{report:?}");
                reaped += 1;
            }
            Err(Error::Reply { name, parameters }) if name == "io.reapd.Reaper.RateLimited" => {
                assert!(parameters.to_string().contains("all callers"), "{parameters}");
                refused += 1;
            }
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!((reaped, refused), (CAP, OVER));
    assert!(
        broker.log_text().matches("all callers").count() >= OVER,
        "the refusals over the cap are audited"
    );
    drop(victims);
}
