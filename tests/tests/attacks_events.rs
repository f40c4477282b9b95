//! Issue 12's new surfaces attacked as hostile local users (kill-event
//! subscriptions, their varlink streaming). Each test is one attack; see
//! docs/threats.md, "Attacks tried (issue 12 pass)".

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reapd_e2e::{bin, fd_count, policy_file, spawn_as, start_with_policy, varlink_socket, Broker, Creds};
use serde_json::Value;

/// The crowd: 32 uids, as a subuid range (or a user namespace's mapping)
/// gives one user, 4 subscriptions each: the broker's whole 128.
const CROWD: std::ops::Range<u32> = 61440..61472;
/// One more unprivileged uid, after the crowd.
const LATE: u32 = 61472;
/// A watcher the policy names (`watch` over the crowd's processes).
const NAMED: u32 = 61480;

/// A `hold-watches` process, killed on drop (a failing test leaves none).
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hold-watches` as `creds`, holding `n` subscriptions; its replies
/// (`ready` or an error name).
fn hold(broker: &Broker, creds: Creds, n: usize) -> (Holder, Vec<String>) {
    let mut command = Command::new(bin("hold-watches"));
    command
        .arg(varlink_socket(broker))
        .arg(n.to_string())
        .stdout(Stdio::piped());
    let mut child = Holder(spawn_as(creds, &[], &mut command));
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let replies = (0..n)
        .map(|_| {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line.trim().to_string()
        })
        .collect();
    (child, replies)
}

/// One `WatchKills` call over a fresh connection as root (this process);
/// its first reply.
fn subscribe_as_root(broker: &Broker) -> (UnixStream, Value) {
    let mut s = UnixStream::connect(varlink_socket(broker)).unwrap();
    s.write_all(b"{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true}\0")
        .unwrap();
    let reply = read_reply(&mut s);
    (s, reply)
}

fn read_reply(s: &mut UnixStream) -> Value {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != 0 {
        reply.push(byte[0]);
    }
    serde_json::from_slice(&reply).unwrap_or(Value::Null)
}

#[test]
fn a_crowd_of_uids_cannot_take_the_subscriptions_of_root_or_of_a_named_watcher() {
    let policy = policy_file(&format!(
        "[[rule]]\nname = \"noc\"\nactions = [\"watch\"]\ncaller.uids = [{NAMED}]\ntarget.uids = [\"{}-{}\"]\n",
        CROWD.start,
        CROWD.end - 1
    ));
    let broker = start_with_policy(&policy);
    let mut crowd = Vec::new();
    for uid in CROWD {
        let (child, replies) = hold(&broker, Creds::uid(uid), 4);
        assert!(replies.iter().all(|r| r == "ready"), "uid {uid}: {replies:?}");
        crowd.push(child);
    }
    assert_eq!(subscribers(&broker), 128, "the crowd holds the whole shared pool");
    // The shared pool is full: one more unprivileged uid waits its turn.
    let (late, replies) = hold(&broker, Creds::uid(LATE), 1);
    assert_eq!(replies, ["io.reapd.Reaper.RateLimited"]);
    // Root and the watcher the policy names still subscribe.
    let (_root, reply) = subscribe_as_root(&broker);
    assert_eq!(
        reply["parameters"]["ready"], true,
        "root locked out by a crowd: {reply}"
    );
    let (named, replies) = hold(&broker, Creds::uid(NAMED), 1);
    assert_eq!(replies, ["ready"], "the policy's watcher locked out by a crowd");
    drop((crowd, late, named));
}

/// Broker-side subscriptions open now, read from its metrics as root.
fn subscribers(broker: &Broker) -> u64 {
    let mut s = UnixStream::connect(varlink_socket(broker)).unwrap();
    s.write_all(b"{\"method\":\"io.systemd.Metrics.List\",\"more\":true}\0")
        .unwrap();
    loop {
        let reply = read_reply(&mut s);
        let p = &reply["parameters"];
        if p["name"] == "io.reapd.event_subscribers" {
            return p["value"].as_u64().unwrap();
        }
        assert_eq!(reply["continues"], true, "no event_subscribers metric: {reply}");
    }
}

/// Waits until the broker holds no subscription and no more fds than
/// `baseline`.
fn wait_released(broker: &Broker, baseline: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (subs, fds) = (subscribers(broker), fd_count(broker.pid()));
        if subs == 0 && fds <= baseline {
            return;
        }
        let open: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", broker.pid()))
            .map(|d| d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).collect())
            .unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "{what}: {subs} subscriptions, {fds} fds (baseline {baseline}): {open:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn odd_watch_kills_calls_leak_no_subscription_fd_or_task() {
    const WATCH: &[u8] = b"{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true}\0";
    let broker = Broker::start();
    let socket = varlink_socket(&broker);
    // Warm up (the fds a first varlink call opens for good), then count.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(WATCH).unwrap();
    let _ = read_reply(&mut s);
    drop(s);
    wait_released(&broker, usize::MAX, "warm-up");
    let baseline = fd_count(broker.pid());
    const INFO: &[u8] = b"{\"method\":\"org.varlink.service.GetInfo\"}\0";

    // oneway: no reply may be sent, so nothing is subscribed; the
    // connection ends, and a call pipelined after it gets no answer.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true,\"oneway\":true}\0")
        .unwrap();
    // The broker may already have closed (EPIPE): that is the point.
    let _ = s.write_all(INFO);
    let mut rest = Vec::new();
    // The broker closes with the pipelined call unread: a reset, or EOF.
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    // Pipelined after a subscription: left unread, then the hang-up is
    // still seen.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(WATCH).unwrap();
    s.write_all(INFO).unwrap();
    assert_eq!(read_reply(&mut s)["parameters"]["ready"], true);
    drop(s);

    // With fds attached (the call names none): they are closed at once.
    let fds: Vec<_> = (0..8).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
    let raw: Vec<_> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let reply = reapd_e2e::varlink_call_as(
        Creds::uid(LATE),
        &socket,
        "{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true}",
        &raw,
    );
    assert_eq!(reply["parameters"]["ready"], true, "{reply}");

    // Half-closed after the call, and a hang-up mid-message.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(WATCH).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = read_reply(&mut s);
    drop(s);
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(&WATCH[..20]).unwrap();
    drop(s);

    // Many subscribe-and-hang-up rounds in a row.
    for _ in 0..50 {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(WATCH).unwrap();
        let _ = read_reply(&mut s);
    }
    wait_released(&broker, baseline, "after odd WatchKills calls");
}
