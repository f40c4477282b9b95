// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-cgroup kills (issue 12): all or nothing, forks during the kill
//! caught, thousands of members killed and reaped fast, units found only
//! where root names them. Real cgroups, real processes, real uids.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reapd_e2e::{top, varlink_call_as, varlink_socket, Broker, CgroupTree, Creds, TestCgroup, Value, Victim};

const U: u32 = 61600;

fn kill_cgroup(broker: &Broker, creds: Creds, params: &str) -> Value {
    varlink_call_as(
        creds,
        &varlink_socket(broker),
        &format!(r#"{{"method":"io.reapd.Reaper.KillCgroup","parameters":{{{params}}}}}"#),
        &[],
    )
}

/// The group is empty (`cgroup.events`: `populated 0`), waited for.
fn wait_empty(cg: &TestCgroup, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let events = std::fs::read_to_string(cg.dir.join("cgroup.events")).unwrap_or_default();
        if events.contains("populated 0") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// `n` processes of uid `uid` in `cg`, forked by one python3 parent that
/// is itself in the group; returns the parent once all are in.
fn populate(cg: &TestCgroup, uid: u32, n: usize) -> std::process::Child {
    let procs = cg.dir.join("cgroup.procs");
    let code = format!(
        "import os, sys, time\n\
         open('{procs}', 'w').write('0')\n\
         os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n\
         for _ in range({n}):\n\
         \x20   if os.fork() == 0:\n\
         \x20       b = bytearray(1 << 20)\n\
         \x20       time.sleep(600); os._exit(0)\n\
         print('ready', flush=True)\n\
         time.sleep(600)\n",
        procs = procs.display()
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(code)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

#[test]
fn a_group_of_the_callers_processes_is_killed_and_reaped_entirely() {
    let t = top("group-all");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/job.scope"));
    let broker = Broker::start();
    let mut parent = populate(&cg, U, 20);
    let reply = kill_cgroup(&broker, Creds::uid(U), &format!(r#""cgroup":"/{t}/job.scope""#));
    let members = reply["parameters"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(members.len(), 21, "20 children and their parent: {reply}");
    assert!(wait_empty(&cg, Duration::from_secs(5)), "the group must be empty");
    assert!(reply["parameters"]["bytesReleased"].as_u64().unwrap() > 0, "{reply}");
    let _ = parent.wait();
}

#[test]
fn one_refused_member_means_nothing_is_killed_and_it_is_named() {
    let t = top("group-refused");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/mixed.scope"));
    let broker = Broker::start();
    let mine: Vec<Victim> = (0..5).map(|_| Victim::spawn(Creds::uid(U), 0)).collect();
    for v in &mine {
        cg.add(v.pid);
    }
    let root = Victim::spawn(Creds::ROOT, 0);
    cg.add(root.pid);
    let reply = kill_cgroup(&broker, Creds::uid(U), &format!(r#""cgroup":"/{t}/mixed.scope""#));
    assert_eq!(reply["error"], "io.reapd.Reaper.PermissionDenied", "{reply}");
    let reason = reply["parameters"]["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("member pid {}", root.pid)), "{reason}");
    assert!(reason.contains("nothing was killed"), "{reason}");
    assert!(mine.iter().all(Victim::running), "no member may die");
    assert!(root.running());
}

#[test]
fn processes_forked_during_the_kill_are_caught() {
    let t = top("group-forks");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/forker.scope"));
    let broker = Broker::start();
    // A parent that forks as fast as it can, forever.
    let procs = cg.dir.join("cgroup.procs");
    let code = format!(
        "import os, time\n\
         open('{}', 'w').write('0')\n\
         os.setresgid({U}, {U}, {U}); os.setresuid({U}, {U}, {U})\n\
         print('ready', flush=True)\n\
         while True:\n\
         \x20   if os.fork() == 0:\n\
         \x20       time.sleep(600); os._exit(0)\n",
        procs.display()
    );
    let mut forker = Command::new("python3")
        .arg("-c")
        .arg(code)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(forker.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Let it build up some children (observable: the member count).
    let deadline = Instant::now() + Duration::from_secs(10);
    while reapd::engine::group::member_pids(&cg.dir).len() < 50 {
        assert!(Instant::now() < deadline, "the forker did not fork");
        std::thread::sleep(Duration::from_millis(5));
    }
    let reply = kill_cgroup(&broker, Creds::uid(U), &format!(r#""cgroup":"/{t}/forker.scope""#));
    assert!(reply["parameters"]["members"].is_array(), "{reply}");
    assert!(
        wait_empty(&cg, Duration::from_secs(5)),
        "a child escaped the kill: {reply}"
    );
    let _ = forker.wait();
}

#[test]
fn two_thousand_members_are_killed_and_reaped_in_well_under_ten_seconds() {
    let t = top("group-2000");
    let _tree = CgroupTree::new(&t);
    let cg = TestCgroup::new(&format!("{t}/big.scope"));
    let broker = Broker::start();
    let mut parent = populate(&cg, U, 1999);
    let started = Instant::now();
    let reply = kill_cgroup(&broker, Creds::uid(U), &format!(r#""cgroup":"/{t}/big.scope""#));
    let took = started.elapsed();
    let members = reply["parameters"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(members.len(), 2000);
    assert!(wait_empty(&cg, Duration::from_secs(10)), "the group must be empty");
    eprintln!(
        "KillCgroup of 2000 members: {took:?} (kill to last reap {} ms)",
        reply["parameters"]["killToReapNs"].as_u64().unwrap() / 1_000_000
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let _ = parent.wait();

    // The same over gRPC: a reply listing 2,000 members (~300 KiB) arrives
    // whole (a reply too big to encode would fail after the kill).
    let mut parent = populate(&cg, U, 1999);
    let mut client = reapd_client::blocking::Client::connect(&broker.grpc).unwrap();
    let report = client
        .kill_cgroup(reapd_client::Group::Cgroup(format!("/{t}/big.scope")), None)
        .unwrap();
    assert_eq!((report.members.len(), report.members_total), (2000, 2000));
    assert!(wait_empty(&cg, Duration::from_secs(10)), "the group must be empty");
    let _ = parent.wait();
}

#[test]
fn a_unit_is_found_only_where_root_names_it() {
    let t = top("group-unit");
    let _tree = CgroupTree::new(&t);
    let unit = format!("reapd-test-{}.service", std::process::id());
    let real = TestCgroup::new(&format!("{t}/system.slice/{unit}"));
    // The same name inside a subtree delegated to the caller does not count.
    let deleg = TestCgroup::new(&format!("{t}/user.slice/user@{U}.service"));
    std::os::unix::fs::chown(&deleg.dir, Some(U), Some(U)).unwrap();
    std::os::unix::fs::chown(deleg.dir.join("cgroup.procs"), Some(U), Some(U)).unwrap();
    let forged = TestCgroup::new(&format!("{t}/user.slice/user@{U}.service/{unit}"));
    let broker = Broker::start();
    let in_real = Victim::spawn(Creds::uid(U), 0);
    real.add(in_real.pid);
    let in_forged = Victim::spawn(Creds::uid(U), 0);
    forged.add(in_forged.pid);
    let reply = kill_cgroup(&broker, Creds::uid(U), &format!(r#""unit":"{unit}""#));
    assert_eq!(
        reply["parameters"]["cgroup"],
        format!("/{t}/system.slice/{unit}"),
        "{reply}"
    );
    assert!(wait_empty(&real, Duration::from_secs(5)));
    assert!(in_forged.running(), "the forged unit's process must live");
}

/// The same through reapctl and the Rust client, over gRPC and varlink:
/// `reapctl candidates` lists the group's processes, `reapctl kill
/// --cgroup` kills them all.
#[test]
fn reapctl_lists_candidates_and_kills_a_cgroup_over_both_transports() {
    let t = top("group-reapctl");
    let _tree = CgroupTree::new(&t);
    let broker = Broker::start();
    let varlink = varlink_socket(&broker);
    for transport in ["grpc", "varlink"] {
        let cg = TestCgroup::new(&format!("{t}/{transport}.scope"));
        let victims: Vec<Victim> = (0..3).map(|_| Victim::spawn(Creds::uid(U + 1), 1 << 20)).collect();
        for v in &victims {
            cg.add(v.pid);
        }
        let run = |extra: &[&str]| {
            let mut command = Command::new(reapd_e2e::bin("reapctl"));
            if transport == "varlink" {
                command.arg("--varlink").arg("--socket").arg(&varlink);
            } else {
                command.arg("--socket").arg(&broker.grpc);
            }
            command.arg("--json").args(extra);
            reapd_e2e::CtlResult::from(reapd_e2e::run_as(Creds::uid(U + 1), &mut command))
        };
        let listed = run(&["candidates", "--limit", "1000"]);
        assert_eq!(listed.code, 0, "{listed:?}");
        let pids: Vec<i64> = listed.json["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["process"]["pid"].as_i64().unwrap())
            .collect();
        for v in &victims {
            assert!(pids.contains(&(v.pid as i64)), "{transport}: {listed:?}");
        }
        let path = format!("/{t}/{transport}.scope");
        assert!(
            listed.json["cgroups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["cgroup"] == path),
            "{transport}: the group is a candidate: {listed:?}"
        );
        let killed = run(&["kill", "--cgroup", &path]);
        assert_eq!(killed.code, 0, "{transport}: {killed:?}");
        assert_eq!(killed.json["members"].as_array().unwrap().len(), 3, "{killed:?}");
        assert!(wait_empty(&cg, Duration::from_secs(5)), "{transport}");
    }
}
