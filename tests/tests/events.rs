// SPDX-License-Identifier: MIT OR Apache-2.0
//! Kill events (issue 12, item 5): `WatchKills` delivers one event per kill
//! to the subscribers entitled to see it (the victim's owner, root, callers
//! a `watch` rule grants) and to nobody else, over gRPC and varlink, through
//! `reapctl watch`; a subscriber that never reads costs kills nothing and
//! learns how many events it missed.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reapd_e2e::{policy_file, spawn_as, start_with_policy, varlink_socket, Broker, Creds, Victim};
use serde_json::Value;

/// Owner of most victims.
const A: u32 = 61900;
/// Owner of other victims.
const B: u32 = 61901;
/// A killer granted kill-and-reap over A's and B's processes.
const K: u32 = 61902;
/// An operator granted `watch` over A's processes only.
const W: u32 = 61903;
/// A stranger: no grant, owns only a sentinel.
const X: u32 = 61904;

/// `reapctl watch` running as some uid, its JSON lines collected.
struct Watcher {
    name: &'static str,
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Watcher {
    /// Starts `reapctl [--varlink] --json watch` as `creds` and returns once
    /// it is subscribed (it says so on stderr).
    fn start(broker: &Broker, name: &'static str, creds: Creds, varlink: bool) -> Watcher {
        let mut command = reapd_e2e::reapctl_over(broker, varlink);
        command
            .args(["--json", "watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_as(creds, &[], &mut command);
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(
            line.contains("watching kill events"),
            "watcher {name} did not subscribe: {line}"
        );
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                let event: Value = serde_json::from_str(&line).expect("one JSON event per line");
                if sender.send(event).is_err() {
                    break;
                }
            }
        });
        Watcher { name, child, events }
    }

    /// Events until (and including) the one that kills `sentinel`.
    fn until(&self, sentinel: i32) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("watcher {} never saw its sentinel {sentinel}; had {out:?}", self.name));
            let last = victim_pids(&event).contains(&sentinel);
            out.push(event);
            if last {
                return out;
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn victim_pids(event: &Value) -> Vec<i32> {
    event["victims"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|v| v["process"]["pid"].as_i64())
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// Kills `pid` as `creds` through reapctl; returns the reply.
fn kill(broker: &Broker, creds: Creds, pid: i32) -> Value {
    let r = broker.reapctl(creds, &["kill", &pid.to_string()]);
    assert_eq!(r.code, 0, "kill {pid} as {creds:?}: {r:?}");
    r.json
}

fn policy_text() -> String {
    format!(
        "[limits]\nkills = 100000\nburst = 100000\nmax-in-flight = 64\n\
         [[rule]]\nname = \"ops-watch\"\nactions = [\"watch\"]\ncaller.uids = [{W}]\ntarget.uids = [{A}]\n\
         [[rule]]\nname = \"k-kills\"\nactions = [\"kill-and-reap\"]\ncaller.uids = [{K}]\ntarget.uids = [{A}, {B}]\n"
    )
}

#[test]
fn kill_events_reach_the_entitled_and_nobody_else_on_both_transports() {
    let policy = policy_file(&policy_text());
    let broker = start_with_policy(&policy);
    // A subscriber that never reads, present throughout.
    let mut stalled = UnixStream::connect(varlink_socket(&broker)).unwrap();
    stalled
        .write_all(b"{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true}\0")
        .unwrap();

    let owner_grpc = Watcher::start(&broker, "owner-grpc", Creds::uid(A), false);
    let owner_varlink = Watcher::start(&broker, "owner-varlink", Creds::uid(A), true);
    let ops = Watcher::start(&broker, "ops", Creds::uid(W), false);
    let other_owner = Watcher::start(&broker, "other-owner", Creds::uid(B), true);
    let stranger = Watcher::start(&broker, "stranger", Creds::uid(X), false);
    let root = Watcher::start(&broker, "root", Creds::ROOT, true);

    let mut a1 = Victim::spawn(Creds::uid(A), 4 << 20);
    let mut b1 = Victim::spawn(Creds::uid(B), 0);
    let mut a2 = Victim::spawn(Creds::uid(A), 0);
    let a1_reply = kill(&broker, Creds::uid(K), a1.pid);
    kill(&broker, Creds::uid(K), b1.pid);
    kill(&broker, Creds::uid(A), a2.pid);
    for v in [&mut a1, &mut b1, &mut a2] {
        assert_eq!(v.wait(), Some(libc::SIGKILL));
    }
    // One sentinel per uid, killed last by root: each watcher's own
    // sentinel ends what it may see (events go out in kill order, before
    // each kill's reply).
    let sentinels: Vec<(u32, Victim)> = [A, W, B, X]
        .into_iter()
        .map(|uid| (uid, Victim::spawn(Creds::uid(uid), 0)))
        .collect();
    for (_, s) in &sentinels {
        kill(&broker, Creds::ROOT, s.pid);
    }
    let sentinel = |uid: u32| sentinels.iter().find(|(u, _)| *u == uid).unwrap().1.pid;
    let pids = |events: &[Value]| events.iter().flat_map(victim_pids).collect::<Vec<_>>();

    for watcher in [&owner_grpc, &owner_varlink] {
        let events = watcher.until(sentinel(A));
        assert_eq!(
            pids(&events),
            vec![a1.pid, a2.pid, sentinel(A)],
            "{}: {events:#?}",
            watcher.name
        );
        let first = &events[0];
        assert_eq!(first["requester"]["uid"], K, "{first}");
        assert_eq!(first["rule"], "k-kills", "{first}");
        assert_eq!(first["kind"], "process", "{first}");
        assert_eq!(first["complete"], true, "{first}");
        assert_eq!(first["dropped"], 0, "{first}");
        let victim = &first["victims"][0];
        assert_eq!(victim["seen_as"], "owner", "{first}");
        // The event says what the requester's reply said.
        assert_eq!(victim["outcome"], a1_reply["outcome"], "{first}");
        assert_eq!(first["bytes_released"], a1_reply["bytes_released"], "{first}");
        assert_eq!(first["kill_path"], a1_reply["kill_path"], "{first}");
        assert_eq!(victim["process"]["uid"], A, "{first}");
        assert!(
            victim["memory_before"]["anon_bytes"].as_u64().unwrap() >= 4 << 20,
            "{first}"
        );
        assert_eq!(events[1]["rule"], "kill(2)", "{}", events[1]);
    }
    let events = ops.until(sentinel(W));
    assert_eq!(
        pids(&events),
        vec![a1.pid, a2.pid, sentinel(A), sentinel(W)],
        "{events:#?}"
    );
    assert_eq!(events[0]["victims"][0]["seen_as"], "ops-watch");
    let events = other_owner.until(sentinel(B));
    assert_eq!(pids(&events), vec![b1.pid, sentinel(B)], "{events:#?}");
    let events = stranger.until(sentinel(X));
    assert_eq!(pids(&events), vec![sentinel(X)], "{events:#?}");
    let events = root.until(sentinel(X));
    let all: BTreeSet<i32> = pids(&events).into_iter().collect();
    let expected: BTreeSet<i32> = [a1.pid, b1.pid, a2.pid]
        .into_iter()
        .chain(sentinels.iter().map(|(_, s)| s.pid))
        .collect();
    assert_eq!(all, expected);
    assert!(events.iter().all(|e| e["victims"][0]["seen_as"] == "root"));
    // The stalled subscriber got its `ready` reply and nothing blocked.
    let mut first = [0u8; 64];
    let n = stalled.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("\"ready\":true"));
}

#[test]
fn a_subscriber_that_never_reads_costs_kills_nothing_and_learns_what_it_missed() {
    let policy = policy_file(&policy_text());
    let broker = start_with_policy(&policy);
    let mut stalled = UnixStream::connect(varlink_socket(&broker)).unwrap();
    stalled
        .write_all(b"{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true}\0")
        .unwrap();
    let mut ready = Vec::new();
    let mut byte = [0u8; 1];
    while stalled.read(&mut byte).unwrap() == 1 && byte[0] != 0 {
        ready.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&ready).contains("\"ready\":true"));

    // Far more kills than its queue (256) and its socket buffer hold. If a
    // full subscriber could block a kill, this loop would hang.
    const KILLS: usize = 900;
    let mut client = reapd_client::blocking::Client::connect(&broker.grpc).unwrap();
    let started = Instant::now();
    for chunk in 0..KILLS / 100 {
        let mut victims: Vec<Victim> = (0..100).map(|_| Victim::spawn(Creds::uid(A), 0)).collect();
        for v in &mut victims {
            let report = client.kill_and_reap(reapd_client::Target::pid(v.pid), None).unwrap();
            assert_ne!(report.outcome.as_str(), "already_dying", "chunk {chunk}");
            v.wait();
        }
    }
    let took = started.elapsed();

    // Now read everything, while single kills follow until one of them
    // arrives: it carries the count of any drops at the end. What arrived
    // plus what was dropped is then every kill.
    let (sender, sequences) = mpsc::channel::<(u64, u64)>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stalled);
        loop {
            let mut message = Vec::new();
            if reader.read_until(0, &mut message).unwrap_or(0) == 0 {
                return;
            }
            message.pop();
            let reply: Value = serde_json::from_slice(&message).unwrap();
            assert_eq!(reply["continues"], true, "{reply}");
            let event = &reply["parameters"]["event"];
            let seen = (event["sequence"].as_u64().unwrap(), event["dropped"].as_u64().unwrap());
            if sender.send(seen).is_err() {
                return;
            }
        }
    });
    let (mut total, mut received, mut dropped) = (KILLS as u64, 0u64, 0u64);
    'flush: for _ in 0..100 {
        let mut last = Victim::spawn(Creds::uid(A), 0);
        client.kill_and_reap(reapd_client::Target::pid(last.pid), None).unwrap();
        last.wait();
        total += 1;
        while let Ok((sequence, missed)) = sequences.recv_timeout(Duration::from_millis(200)) {
            received += 1;
            dropped += missed;
            if sequence == total {
                break 'flush;
            }
        }
    }
    assert!(
        dropped > 0,
        "a subscriber that never read lost nothing? ({received} received)"
    );
    assert_eq!(
        received + dropped,
        total,
        "every kill is either delivered or counted as dropped"
    );
    eprintln!("{KILLS} kills in {took:?} with a stalled subscriber: {received} delivered, {dropped} dropped");
}

#[test]
fn watch_kills_needs_more_and_is_capped_per_uid() {
    let broker = Broker::start();
    let call = |message: &str| {
        let mut s = UnixStream::connect(varlink_socket(&broker)).unwrap();
        s.write_all(message.as_bytes()).unwrap();
        s.write_all(b"\0").unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != 0 {
            reply.push(byte[0]);
        }
        (s, serde_json::from_slice::<Value>(&reply).unwrap())
    };
    let (_, reply) = call(r#"{"method":"io.reapd.Reaper.WatchKills"}"#);
    assert_eq!(reply["error"], "org.varlink.service.ExpectedMore", "{reply}");
    // Root's four subscriptions fill its quota; the fifth is refused with
    // the typed rate-limit error, and another uid is unaffected.
    let held: Vec<_> = (0..4)
        .map(|_| {
            let (s, reply) = call(r#"{"method":"io.reapd.Reaper.WatchKills","more":true}"#);
            assert_eq!(reply["parameters"]["ready"], true, "{reply}");
            s
        })
        .collect();
    let (_, reply) = call(r#"{"method":"io.reapd.Reaper.WatchKills","more":true}"#);
    assert_eq!(reply["error"], "io.reapd.Reaper.RateLimited", "{reply}");
    assert_eq!(reply["parameters"]["kind"], "rate_limited", "{reply}");
    let other = Watcher::start(&broker, "other", Creds::uid(X), false);
    // A hung-up subscriber frees its slot.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, reply) = call(r#"{"method":"io.reapd.Reaper.WatchKills","more":true}"#);
        if reply["parameters"]["ready"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed: {reply}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(other);
}

#[test]
fn watch_streams_end_when_the_broker_stops() {
    let mut broker = Broker::start();
    let mut watcher = Watcher::start(&broker, "grpc", Creds::uid(A), false);
    let mut varlink_watcher = Watcher::start(&broker, "varlink", Creds::uid(A), true);
    let started = Instant::now();
    broker.stop();
    for w in [&mut watcher, &mut varlink_watcher] {
        let status = w.child.wait().unwrap();
        assert!(status.success(), "{}: {status:?}", w.name);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}
