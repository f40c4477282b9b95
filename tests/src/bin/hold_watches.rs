//! `hold-watches SOCKET N`: opens N varlink `WatchKills` subscriptions on
//! SOCKET (one connection each), prints one line per reply (`ready` or the
//! error's name), then holds them all until killed. Run under
//! another uid (the tests' `spawn_as`) it is one hostile user filling its
//! share of the broker's subscription slots.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("SOCKET");
    let n: usize = args.next().expect("N").parse().expect("N is a count");
    let mut held = Vec::new();
    let mut out = std::io::stdout().lock();
    for _ in 0..n {
        let mut stream = UnixStream::connect(&socket).expect("connect");
        stream
            .write_all(b"{\"method\":\"io.reapd.Reaper.WatchKills\",\"more\":true}\0")
            .expect("write");
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).expect("read") == 1 && byte[0] != 0 {
            reply.push(byte[0]);
        }
        let reply: serde_json::Value = serde_json::from_slice(&reply).expect("a JSON reply");
        match reply["error"].as_str() {
            Some(error) => writeln!(out, "{error}").unwrap(),
            None => writeln!(out, "ready").unwrap(),
        }
        held.push(stream);
    }
    out.flush().unwrap();
    drop(out);
    // Held until the test kills this process.
    loop {
        std::thread::park();
        let _ = &held;
    }
}
