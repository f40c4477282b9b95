// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-call timeouts, against a "broker" that accepts connections and never
//! answers: each transport gives up with the typed timeout error, neither
//! before its bound nor long after it. No real broker is needed, so these
//! run anywhere (no root, no host policy).

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use reapd_client::Error;

/// The bound the tests set: short, so the suite stays fast.
const BOUND: Duration = Duration::from_millis(300);
/// How late past its bound a call may give up (a loaded CI machine).
const SLACK: Duration = Duration::from_secs(3);

/// A socket that accepts every connection, reads what is sent and never
/// writes a byte. Dropped at the end of the test (the thread is left
/// blocked in accept; the process ends with the test binary).
struct SilentBroker {
    _dir: TempDir,
    path: PathBuf,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("reapd-client-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

impl SilentBroker {
    fn start(name: &str) -> Self {
        let dir = temp_dir(name);
        let path = dir.0.join("broker.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // Drain what the client sends (so its writes never block)
                // and hold the connection open without answering.
                thread::spawn(move || {
                    let mut stream = stream;
                    let mut sink = [0u8; 4096];
                    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
        SilentBroker { _dir: dir, path }
    }
}

/// `result` is a timeout after `BOUND`, and it came within the bound's
/// slack of `started`.
fn assert_timed_out<T: std::fmt::Debug>(what: &str, result: Result<T, Error>, started: Instant, bound: Duration) {
    let took = started.elapsed();
    match result {
        Err(Error::Timeout { after }) => assert_eq!(after, bound, "{what}: the error names the bound"),
        other => panic!("{what}: expected a timeout, got {other:?}"),
    }
    assert!(
        took >= bound,
        "{what}: gave up after {took:?}, before its bound {bound:?}"
    );
    assert!(took < bound + SLACK, "{what}: gave up after {took:?}, bound {bound:?}");
}

#[cfg(feature = "grpc")]
#[test]
fn grpc_calls_time_out_against_a_broker_that_never_answers() {
    let broker = SilentBroker::start("grpc");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = reapd_client::Client::connect_with_timeout(&broker.path, Some(BOUND))
            .await
            .expect("the socket accepts");
        assert_eq!(client.timeout(), Some(BOUND));
        let started = Instant::now();
        let result = client.capabilities().await;
        assert_timed_out("gRPC capabilities", result, started, BOUND);

        let started = Instant::now();
        let result = client.check_permission(reapd_client::Target::pid(1)).await;
        assert_timed_out("gRPC check_permission", result, started, BOUND);

        // A kill is bounded by the timeout plus the waits it asks for: none
        // here (reap delay 0), so by the timeout alone.
        let options = reapd_client::KillOptions {
            reap_delay: Some(Duration::ZERO),
            ..Default::default()
        };
        let started = Instant::now();
        let result = client
            .kill_and_reap_with(reapd_client::Target::pid(i32::MAX), options)
            .await;
        assert_timed_out("gRPC kill_and_reap_with", result, started, BOUND);

        // The subscription is bounded until it exists.
        let started = Instant::now();
        let result = client.watch_kills().await.map(|_| ());
        assert_timed_out("gRPC watch_kills", result, started, BOUND);
    });
}

#[cfg(feature = "grpc")]
#[test]
fn the_blocking_grpc_client_times_out_too_and_the_bound_can_be_changed() {
    let broker = SilentBroker::start("blocking");
    let client = reapd_client::blocking::Client::connect(&broker.path).expect("the socket accepts");
    assert_eq!(client.timeout(), Some(reapd_client::DEFAULT_TIMEOUT));
    let mut client = client.with_timeout(Some(BOUND));
    let started = Instant::now();
    let result = client.capabilities();
    assert_timed_out("blocking gRPC capabilities", result, started, BOUND);
}

/// The transport-independent error of a varlink result.
#[cfg(feature = "varlink")]
fn to_crate<T>(result: Result<T, reapd_client::varlink::Error>) -> Result<T, Error> {
    result.map_err(Error::from)
}

#[cfg(feature = "varlink")]
#[test]
fn varlink_calls_time_out_against_a_broker_that_never_answers() {
    use reapd_client::varlink::Client;
    let broker = SilentBroker::start("varlink");
    let client = Client::connect(&broker.path).expect("the socket accepts");
    assert_eq!(client.timeout(), Some(reapd_client::DEFAULT_TIMEOUT));
    let mut client = client.with_timeout(Some(BOUND));

    let started = Instant::now();
    let result = to_crate(client.capabilities());
    assert_timed_out("varlink capabilities", result, started, BOUND);

    let started = Instant::now();
    let result = to_crate(client.check_permission(reapd_client::Target::pid(1)));
    assert_timed_out("varlink check_permission", result, started, BOUND);

    let options = reapd_client::KillOptions {
        reap_delay: Some(Duration::ZERO),
        ..Default::default()
    };
    let started = Instant::now();
    let result = to_crate(client.kill_and_reap_with(reapd_client::Target::pid(i32::MAX), options));
    assert_timed_out("varlink kill_and_reap_with", result, started, BOUND);

    let started = Instant::now();
    let result = to_crate(client.call_more("io.systemd.Metrics.List", serde_json::json!({})));
    assert_timed_out("varlink call_more", result, started, BOUND);

    let started = Instant::now();
    let result = to_crate(client.watch_kills().map(|_| ()));
    assert_timed_out("varlink watch_kills", result, started, BOUND);
}

/// A varlink connection whose call timed out is not used again: the late
/// reply would otherwise answer the next call. The "broker" answers the
/// first call only after the client has given up on it, then answers the
/// next connection at once; the second call must get that second answer.
#[cfg(feature = "varlink")]
#[test]
fn a_varlink_reply_that_comes_after_the_timeout_answers_no_later_call() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    let dir = temp_dir("late");
    let path = dir.0.join("broker.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (gave_up, wait_for_give_up) = mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let reply = |version: &str| format!("{{\"parameters\":{{\"brokerVersion\":\"{version}\"}}}}\0");
        let read_call = |stream: &mut UnixStream| {
            let mut byte = [0u8; 1];
            while stream.read_exact(&mut byte).is_ok() && byte[0] != 0 {}
        };
        let (mut first, _) = listener.accept().expect("first connection");
        read_call(&mut first);
        wait_for_give_up.recv().expect("the client gives up");
        // The client may already have closed this connection (EPIPE here):
        // what it must not do is read this reply as the next call's.
        let _ = first.write_all(reply("late").as_bytes());
        let (mut second, _) = listener.accept().expect("second connection");
        read_call(&mut second);
        second.write_all(reply("fresh").as_bytes()).expect("fresh reply");
        // Hold both open until the client has read its answer.
        let mut rest = [0u8; 64];
        let _ = second.read(&mut rest);
        drop(first);
    });

    let mut client = reapd_client::varlink::Client::connect_with_timeout(&path, Some(BOUND)).expect("connect");
    let started = Instant::now();
    let result = client.capabilities().map_err(Error::from);
    assert_timed_out("varlink capabilities", result, started, BOUND);
    gave_up.send(()).expect("server waits");
    let caps = client.capabilities().expect("the second call is answered");
    assert_eq!(
        caps.broker_version, "fresh",
        "the second call got the first call's late reply"
    );
    assert_eq!(client.reconnects(), 1);
    drop(client);
    server.join().expect("server thread");
}
